"""EF21 error feedback (Richtárik, Sokolov, Fatkhullin, "EF21: A new, simpler, theoretically
better, and practically faster error feedback", NeurIPS 2021).

The method, in the notation ``x`` (model), ``g_i`` (worker i's gradient estimate), ``C`` (compressor):

    x^(k+1) = x^(k) - (gamma/n) sum_i g_i^(k),      g_i^(k+1) = g_i^(k) + C(grad f_i(x^(k+1)) - g_i^(k)):

each worker m keeps an estimate ``g_m`` of its gradient (``g_m^(0) = 0``) and, every round,
sends ``c = C(grad - g_m)``, the compressed *difference*, then sets ``g_m <- g_m + c``. The
server adds ``c`` to its running aggregate (``absorb = "accumulate"``; it keeps no per-worker
copy), which is therefore ``sum_m g_m``: the float64 ``to_dense(c)`` both sides add is the same
bit for bit. The model step is the server's usual ``theta -= lr * aggregate``, as for every
algorithm.

Why it works: for a contractive C with constant delta (``E||C(x) - x||^2 <= (1 - delta)||x||^2``),
``||g_m^(k+1) - grad||^2 = ||C(grad - g_m) - (grad - g_m)||^2 <= (1 - delta) ||g_m - grad||^2``,
so on a fixed gradient g_m converges to it geometrically (factor ``sqrt(1 - k/d)`` per round in
norm for top-k), and the distortion vanishes as the gradients settle, unlike compressing the
gradient itself.

Compressor: any registered one, by name (default "topk"); the options other than ``lr`` go
to :func:`psrv.compress.make_compressor`. EF21's guarantee needs a contractive compressor
("contractive" or "exact"). ``init`` refuses an "unbiased" compressor with ``omega >= 1``:
``E||C(x) - x||^2 <= omega ||x||^2`` then allows the distortion to grow every round. An unbiased
compressor with ``omega < 1`` is contractive with ``delta = 1 - omega`` and is accepted. "biased"
compressors (threshold, sq, fp16, bf16) run without the guarantee.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from psrv.algorithms import AlgorithmBase, Decision, RoundInfo, register, split_options
from psrv.compress import Compressor, make_compressor
from psrv.payload import to_dense


@dataclass(frozen=True)
class EF21(AlgorithmBase):
    compressor: Compressor
    lr: float = 0.02
    name: str = "ef21"

    absorb = "accumulate"
    history_depth = 0

    # every self-describing vector can be added; LAQ innovations belong to LAQ's own quantizer
    @property
    def payload_kinds(self) -> tuple[str, ...]:
        return (self.compressor.payload_kind,)

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"ef21 needs lr > 0, got {self.lr}")

    def init(self, dim: int) -> np.ndarray:
        cls = self.compressor.compressor_class(dim)
        if cls.kind == "unbiased" and cls.constant >= 1:
            raise ValueError(
                f"ef21 needs a contractive compressor; {self.compressor.name} is unbiased with omega = "
                f"{cls.constant:.3g} >= 1 at d = {dim}, so the EF21 distortion need not shrink"
            )
        return np.zeros(dim, dtype=np.float64)

    def rejoin(self, dim: int, contribution: np.ndarray | None) -> np.ndarray:
        """A rejoining worker: its estimate ``g_m`` is exactly its row of the server's sum (the sum of
        the compressed differences the server added for it), so it goes on as if it never left."""
        self.init(dim)  # the same checks as a first start
        if contribution is None or contribution.shape != (dim,):
            raise ValueError(f"{self.name}: a rejoining worker needs its row of the server's sum ({dim} values)")
        return np.array(contribution, dtype=np.float64)

    def step(self, state: np.ndarray, grad: np.ndarray, info: RoundInfo, rng: np.random.Generator) -> Decision:
        grad = np.asarray(grad, dtype=np.float64).reshape(-1)
        sent = self.compressor.compress(grad - state, rng)
        g_new = state + to_dense(sent)
        err = grad - g_new
        return Decision(sent, g_new, {"distortion_sq": float(err @ err)})


def _build(options: Mapping[str, float], compressor: str) -> EF21:
    own, rest = split_options(EF21, options)
    return EF21(make_compressor(compressor or "topk", **rest), **own)


register("ef21", _build)
