"""The ``cat`` and ``alistarh`` compressors: the tuning rules of :mod:`psrv.cat` (Khirirat, Magnússon,
Aytekin, Johansson, AAAI 2021, arXiv:2003.06377) and the baseline of Alistarh et al. (NeurIPS 2018)
around top-T, S+Q and stochastic sparsification."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from psrv import payload
from psrv.cat import BASES, COST_MODELS, SIZE_UNITS, CostModel, _kind, alistarh_T, tune
from psrv.compress import CompressorClass, register
from psrv.compress.sq import SQ
from psrv.compress.stochastic import Stochastic
from psrv.compress.topk import TopK


def _name(table: tuple[str, ...], value: float, what: str) -> str:
    i = int(value)
    if i != value or not 0 <= i < len(table):
        raise ValueError(f"{what} must be one of {', '.join(table)} (or 0..{len(table) - 1}), got {value}")
    return table[i]


@dataclass
class _Tuning:
    """Per-instance memory of the hybrid mode (every=S): the T in use and the rounds it has served.
    Each worker builds its own compressor, so this is per worker (eq. 10)."""

    T: int = 0
    age: int = 0
    last_cost: float = 0.0
    history: list[int] = field(default_factory=list)


def _compress_with(base: str, T: int, x: np.ndarray, rng: np.random.Generator, eq9: bool) -> payload.Payload:
    if base == "topk":
        return TopK(k=int(T)).compress(x, rng)
    if base == "sq":
        p = SQ(k=int(T)).compress(x, rng)
        if eq9 and len(p.indices):
            # eq. 9's step sqrt(beta(T)) / (sqrt(T) L) on ||g|| sign(g_j) is (1/L) times the mean magnitude
            # of the top T entries on sign(g_j): with the server's lr = 1/L this payload takes eq. 9's step
            mean = float(np.abs(np.asarray(x, dtype=np.float64)[p.indices]).sum()) / int(T)
            p = dataclasses.replace(p, scale=float(np.float32(mean)))
        return p
    return Stochastic(k=int(T)).compress(x, rng)


@register("cat", "sparse")
@dataclass(eq=False)
class Cat:
    """``--compressor cat -o base=topk|sq|stochastic -o cost=payload|affine|packet -o c0=.. -o c1=..
    -o p_max=BYTES -o size=payload_bits|wire_bytes -o every=S`` (or ``-o cost_file=FIT.json``).
    Each call tunes T on the vector it is given (every ``every`` calls; in between the last T is
    reused, the hybrid mode of Appendix H) and compresses with the base compressor at that T.
    ``eq9=1`` (base sq): the payload's scale is the mean top-T magnitude, so a server step of lr = 1/L
    is eq. 9's step size; ``eq9=0`` sends eq. 3's ``||g||``. Defaults: base=topk, the packet model of
    Experiment 2 (§6) in bits, every=1. ``p_max`` is in
    bytes; c0 and c1 are in cost units (c1 per packet, or per size unit for the affine model)."""

    base: float = 0.0
    # default: the packet model of the paper's Experiment 2 (c1 = 576 bytes a packet, c0 = 64 bytes,
    # P_max = 512 bytes), costs counted in bits (size = payload_bits)
    cost: float = 2.0
    c0: float = 512.0
    c1: float = 4608.0
    p_max: float = 512.0
    size: float = 0.0
    every: float = 1.0
    eq9: float = 1.0
    name: str = "cat"

    def __post_init__(self) -> None:
        self.base_name = _name(BASES, self.base, "cat base")
        self.model = CostModel(
            _name(COST_MODELS, self.cost, "cat cost"),
            float(self.c0),
            float(self.c1),
            float(self.p_max),
            _name(SIZE_UNITS, self.size, "cat size"),
        )
        if int(self.every) != self.every or self.every < 1:
            raise ValueError(f"cat needs an integer every >= 1, got {self.every}")
        self.payload_kind = _kind(self.base_name)
        self.state = _Tuning()

    def choose(self, x: np.ndarray) -> int:
        st = self.state
        if st.T == 0 or st.age >= int(self.every):
            st.T, st.age = tune(x, self.model, self.base_name).T, 0
        st.age += 1
        st.history.append(st.T)
        st.last_cost = float(self.model.cost(self.payload_kind, max(1, x.size), st.T))
        return st.T

    def compress(self, x: np.ndarray, rng: np.random.Generator) -> payload.Payload:
        x = np.asarray(x).reshape(-1)
        return _compress_with(self.base_name, self.choose(x), x, rng, bool(self.eq9))

    def compressor_class(self, dim: int) -> CompressorClass:
        if self.base_name == "stochastic":  # T >= 1: omega <= d - 1 (Lemma 5: omega(T) >= T/d)
            return CompressorClass("unbiased", dim - 1.0)
        if self.base_name == "sq":
            return CompressorClass("biased", 0.0)
        return CompressorClass("contractive", 1.0 / dim)  # T >= 1: top-1's delta


@register("alistarh", "sparse")
@dataclass(eq=False)
class Alistarh(Cat):
    """``--compressor alistarh -o base=topk|sq``: T from :func:`alistarh_T` (every ``every`` calls).
    The cost options only feed ``state.last_cost`` (for reporting C(T) under the same model)."""

    name: str = "alistarh"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base_name == "stochastic":
            raise ValueError("alistarh: base must be topk or sq")

    def choose(self, x: np.ndarray) -> int:
        st = self.state
        if st.T == 0 or st.age >= int(self.every):
            st.T, st.age = alistarh_T(x), 0
        st.age += 1
        st.history.append(st.T)
        st.last_cost = float(self.model.cost(self.payload_kind, max(1, x.size), st.T))
        return st.T
