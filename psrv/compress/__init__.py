"""Compressors, registered by name, shared by worker (compress) and server (decode).

A compressor turns a float vector into a :class:`psrv.payload.Payload`; the
server never needs the compressor to decode (``psrv.payload.to_dense``). Each one
states its class: ``unbiased`` with variance factor omega
(E Q(x) = x, E||Q(x) - x||^2 <= omega ||x||^2) or ``contractive`` with delta
(||Q(x) - x||^2 <= (1 - delta) ||x||^2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from psrv.payload import Payload


@dataclass(frozen=True)
class CompressorClass:
    kind: str  # "unbiased" | "contractive" | "exact"
    constant: float  # omega for unbiased, delta for contractive, 0 for exact


class Compressor(Protocol):
    name: str
    payload_kind: str

    def compress(self, x: np.ndarray, rng: np.random.Generator) -> Payload: ...

    def compressor_class(self, dim: int) -> CompressorClass: ...


COMPRESSORS: dict[str, Callable[..., Compressor]] = {}


def register(name: str, payload_kind: str):
    """Register a compressor class under ``name``; ``payload_kind`` is the Payload kind it
    emits, which the server accepts (and nothing else) from workers using it."""

    def deco(factory):
        factory.payload_kind = payload_kind
        COMPRESSORS[name] = factory
        return factory

    return deco


def make_compressor(name: str, **options: float) -> Compressor:
    if name not in COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}; known: {', '.join(sorted(COMPRESSORS))}")
    try:
        return COMPRESSORS[name](**options)
    except TypeError as exc:
        raise ValueError(f"bad options for compressor {name!r}: {exc}") from None


def _load_builtin() -> None:
    """Import every module of this package once: each registers its compressors."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_load_builtin()
