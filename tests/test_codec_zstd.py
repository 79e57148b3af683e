"""Optional zstd on payloads: used only when it shrinks the payload, decoded with a size bound."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard

from psrv import codec
from psrv.compress import make_compressor
from psrv.payload import to_dense
from psrv.v1 import psrv_pb2 as pb

D = 50_000


def _wire(msg: pb.PushRequest) -> pb.PushRequest:
    return pb.PushRequest.FromString(msg.SerializeToString())


@pytest.mark.parametrize("name", ["dense", "fp16", "topk", "qsgd", "sq", "randk"])
def test_zstd_round_trip_is_exact_and_never_larger(name: str) -> None:
    rng = np.random.default_rng(0)
    p = make_compressor(name).compress(rng.normal(size=D), rng)
    plain = codec.upload_to_proto("w", 1, 0.5, p)
    packed = codec.upload_to_proto("w", 1, 0.5, p, zstd=True)
    assert packed.ByteSize() <= plain.ByteSize()
    back = codec.upload_from_proto(_wire(packed), D)
    assert back.kind == p.kind
    np.testing.assert_array_equal(to_dense(back), to_dense(p))


def test_zstd_used_when_it_pays_and_skipped_when_not() -> None:
    rng = np.random.default_rng(1)
    q = make_compressor("qsgd", levels=4).compress(rng.normal(size=D), rng)
    assert codec.upload_to_proto("w", 0, 0.0, q, zstd=True).WhichOneof("payload") == "zstd"  # low-entropy codes
    tiny = make_compressor("topk", k=1).compress(rng.normal(size=D), rng)
    assert codec.upload_to_proto("w", 0, 0.0, tiny, zstd=True).WhichOneof("payload") == "sparse"


def test_zstd_bomb_and_garbage_are_rejected() -> None:
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (16 * 100 + 4096))
    with pytest.raises(codec.CodecError, match="decompresses to more than"):
        codec.upload_from_proto(pb.PushRequest(zstd=pb.ZstdPayload(kind=pb.PAYLOAD_KIND_DENSE, data=bomb)), 100)
    with pytest.raises(codec.CodecError, match="zstd payload"):
        codec.upload_from_proto(pb.PushRequest(zstd=pb.ZstdPayload(kind=pb.PAYLOAD_KIND_DENSE, data=b"not zstd")), 100)
    with pytest.raises(codec.CodecError, match="unknown kind"):
        codec.upload_from_proto(pb.PushRequest(zstd=pb.ZstdPayload(kind=pb.PAYLOAD_KIND_UNSPECIFIED, data=b"")), 100)
    junk = zstandard.ZstdCompressor().compress(b"\xff" * 40)
    with pytest.raises(codec.CodecError, match="not a valid dense"):
        codec.upload_from_proto(pb.PushRequest(zstd=pb.ZstdPayload(kind=pb.PAYLOAD_KIND_DENSE, data=junk)), 100)
    # a valid inner message is validated like any other: wrong dimension
    inner = codec.payload_to_proto(make_compressor("dense").compress(np.ones(10))).SerializeToString()
    with pytest.raises(codec.CodecError, match="expected 100"):
        codec.upload_from_proto(
            pb.PushRequest(zstd=pb.ZstdPayload(kind=pb.PAYLOAD_KIND_DENSE, data=zstandard.compress(inner))), 100
        )
