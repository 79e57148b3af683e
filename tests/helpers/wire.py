"""An upload through the wire (serialize, parse, decode) and the wire check every compressor's
tests share: the round trip is exact and the serialized size is close to the formula's."""

from __future__ import annotations

from typing import Any

import numpy as np

from psrv import codec
from psrv.compress import make_compressor
from psrv.payload import Payload, payload_bits, to_dense
from psrv.v1 import psrv_pb2 as pb

WIRE_DIMS = [1, 37, 10_000, 20_001]


def wire(p: Payload, d: int) -> tuple[Payload, int]:
    """``p`` as the server gets it from an Upload, and the Upload's size in bytes."""
    data = codec.upload_to_proto("w0", 3, 0.5, p).SerializeToString()
    return codec.upload_from_proto(pb.PushRequest.FromString(data), d), len(data)


def check_wire_round_trip_and_size(name: str, options: dict[str, Any], d: int) -> None:
    rng = np.random.default_rng(d)
    x = rng.normal(size=d)
    p = make_compressor(name, **options).compress(x, rng)
    back, nbytes = wire(p, d)
    assert back.kind == p.kind
    np.testing.assert_array_equal(to_dense(back), to_dense(p))
    assert payload_bits(back) == payload_bits(p)
    if d >= 10_000:
        bits = payload_bits(p)
        assert 8 * nbytes <= 1.02 * bits + 64 * 8, (name, 8 * nbytes, bits)
        if p.indices is None:  # sparse supports may beat the formula through delta-varint indices
            assert abs(8 * nbytes - bits) <= 0.02 * bits + 64 * 8, (name, 8 * nbytes, bits)
