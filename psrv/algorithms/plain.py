"""Every worker uploads every round: distributed gradient descent (Sun et al., NeurIPS 2019, eq. 2),
optionally compressed, optionally with error feedback.

- ``gd``: dense float32 gradients; the baseline.
- ``topk-ef``: top-k sparsification (Aji & Heafield, EMNLP 2017) with error feedback (Stich,
  Cordonnier, Jaggi, "Sparsified SGD with memory", NeurIPS 2018):
  ``p = e + g; send top_k(p); e = p - top_k(p)``.
- ``sgd``: parallel minibatch SGD (the SGD baseline of Deng et al., arXiv:2112.04088, eq. 2):
  ``gd`` where each worker's gradient is taken on ``batch`` rows of its shard, drawn
  without replacement every round (``worker.client._Gradients``; unbiased for grad f_m).
  Default ``batch = 10``: the per-worker minibatch of the SASG paper's setup (§VI-A: ten workers,
  ten samples per worker and iteration).
Any registered compressor can be chosen with ``compressor=``; ``ef=1`` wraps it in
error feedback. ``batch`` works for every name (0 = the full local gradient; a batch
of at least the shard size is the full gradient too, so ``sgd`` then equals ``gd``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from psrv.algorithms import AlgorithmBase, Decision, RoundInfo, register, split_options
from psrv.compress import Compressor, make_compressor
from psrv.compress.feedback import ef_step, init_memory


@dataclass(frozen=True)
class Plain(AlgorithmBase):
    compressor: Compressor
    lr: float = 0.02
    ef: bool = False
    batch: int = 0  # minibatch rows per worker and round; 0 = full local gradient (read by the worker)
    name: str = "gd"

    absorb = "replace"
    history_depth = 0

    def __post_init__(self) -> None:
        if self.batch < 0:
            raise ValueError(f"{self.name}: batch must be >= 0 (0 = full gradient), got {self.batch}")

    @property
    def payload_kinds(self) -> tuple[str, ...]:
        return (self.compressor.payload_kind,)

    def init(self, dim: int) -> Any:
        return init_memory(dim) if self.ef else None

    def step(self, state: Any, grad: np.ndarray, info: RoundInfo, rng: np.random.Generator) -> Decision:
        if self.ef:
            sent, memory = ef_step(self.compressor, state, grad, rng)
            return Decision(sent, memory, {"memory_sq": float(memory @ memory)})
        return Decision(self.compressor.compress(grad, rng), None)


def _factory(name: str, default_compressor: str, default_ef: bool, default_batch: int = 0):
    def build(options: Mapping[str, float], compressor: str) -> Plain:
        own, rest = split_options(Plain, options)
        own.setdefault("ef", default_ef)
        own.setdefault("batch", default_batch)
        return Plain(make_compressor(compressor or default_compressor, **rest), name=name, **own)

    return build


register("gd", _factory("gd", "dense", False))
register("topk-ef", _factory("topk-ef", "topk", True))
register("sgd", _factory("sgd", "dense", False, default_batch=10))
