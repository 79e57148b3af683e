"""The server's memory of the workers' contributions, and their running sum.

Lazy algorithms need the aggregate ``total = sum_m stored_m`` to include, for a worker that
skips, the last thing it contributed (Sun et al., NeurIPS 2019, eq. 4). ``total`` is kept as a
running sum, so a round costs O(uploads * d), not O(M * d). What else is kept depends on how an
upload is absorbed:

- ``"accumulate"`` (LAQ, SLAQ, EF21, RIAG, CIAG): an upload is an increment of the worker's
  stored value (LAQ's innovation, eq. 4; EF21's compressed difference), so ``total += v`` and
  the per-worker values themselves are never needed: only ``total`` is kept, O(d) for any M --
  unless ``keep_rows``: then each worker's own sum of absorbed uploads is kept too (an (M, d)
  float64 array, the same additions in the same order, so row m is bit for bit the reference the
  worker itself holds: LAQ's ``Q_m``, EF21's ``g_m``). That is the price of letting a restarted
  worker of an accumulating rule rejoin (the server hands the row back) and of resuming such a run
  from a checkpoint; the server keeps rows when it checkpoints (``--checkpoint-dir``).
- ``"replace"`` (GD, SGD, top-k EF, LAG-WK, LASG, SASG, LAG-PS): an upload replaces the worker's
  stored value, so ``total += v_new - v_old`` needs ``v_old``. Each worker's last upload is kept
  as the :class:`~psrv.payload.Payload` it arrived as (sparse stays indices + values, dense
  stays in the dtype it was sent in, QSGD stays codes + signs), decoded only to subtract it when
  the worker uploads again (:meth:`Aggregator.contribution` decodes it on request).
  Lossless narrowing only: sparse indices become uint32 when ``d <= 2**32``, codes the
  smallest unsigned type of their bit width.

Arithmetic: exactly that of keeping a dense float64 row per worker (``total += v - stored_m``
for replace, ``total += v`` for accumulate), coordinate by coordinate, so runs are unchanged to
the last bit. Dense kinds are decoded in blocks of ``BLOCK`` coordinates (no d-sized float64
temporaries); sparse kinds touch only the union of the old and new supports: elsewhere the
dense form adds ``0.0 - 0.0``, which leaves ``total`` unchanged (``total`` is never -0.0: it
starts at +0.0 and round-to-nearest gives -0.0 only for -0.0 + -0.0).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from psrv.payload import Payload, qsgd_code_width, to_dense, values_of

#: Coordinates decoded at a time for dense kinds: a 512 KB float64 block.
BLOCK = 1 << 16

_SPARSE_KINDS = ("sparse", "sign_sparse")


def support(p: Payload) -> tuple[np.ndarray, np.ndarray]:
    """Indices and float64 values of a sparse-kind payload: ``to_dense(p)`` on its support."""
    if p.kind == "sparse":
        return p.indices, values_of(p).astype(np.float64)
    if p.kind == "sign_sparse":  # as psrv.payload.to_dense: float32 scale, signed
        return p.indices, np.where(p.signs, -1.0, 1.0) * float(np.float32(p.scale))
    raise ValueError(f"{p.kind} payloads are not sparse")


def decode_block(p: Payload, start: int, stop: int) -> np.ndarray:
    """``to_dense(p)[start:stop]`` without decoding the rest."""
    if p.kind in _SPARSE_KINDS:
        lo, hi = np.searchsorted(p.indices, (start, stop))
        out = np.zeros(stop - start, dtype=np.float64)
        idx, vals = support(dataclasses.replace(p, **_cut(p, lo, hi)))
        out[idx.astype(np.int64) - start] = vals
        return out
    return to_dense(dataclasses.replace(p, dim=stop - start, **_cut(p, start, stop)))


def _cut(p: Payload, start: int, stop: int) -> dict[str, np.ndarray]:
    arrays = {"values": p.values, "indices": p.indices, "codes": p.codes, "signs": p.signs}
    return {k: a[start:stop] for k, a in arrays.items() if a is not None}


def compact(p: Payload) -> Payload:
    """The form a stored payload is kept in: the same vector, integer arrays narrowed losslessly."""
    changes: dict[str, np.ndarray] = {}
    if p.indices is not None and p.dim <= 2**32 and p.indices.dtype != np.uint32:
        changes["indices"] = p.indices.astype(np.uint32)
    if p.codes is not None:
        width = p.bits if p.kind == "laq" else qsgd_code_width(p.bits)
        dtype = np.uint8 if width <= 8 else np.uint16 if width <= 16 else np.uint32
        if p.codes.dtype != dtype:
            changes["codes"] = p.codes.astype(dtype)
    return dataclasses.replace(p, **changes) if changes else p


def payload_nbytes(p: Payload | None) -> int:
    """Bytes of the arrays a payload holds."""
    if p is None:
        return 0
    return sum(a.nbytes for a in (p.values, p.indices, p.codes, p.signs) if a is not None)


class Overflow(ValueError):
    """Absorbing an upload would take the aggregate past ``limit`` (or make it non-finite)."""


def payload_peak(p: Payload) -> float:
    """``max |to_dense(p)|`` (a bound for QSGD, LAQ to a rounding), without a
    d-sized temporary: dense values are scanned block by block."""
    if p.values is not None:
        return peak_abs(values_of(p))
    # decoded with the float32 scale (inf past its max): laq |2 tau R c - R| <= R (to rounding), qsgd <= norm
    return abs(float(np.float32(p.scale)))


def peak_abs(x: np.ndarray) -> float:
    """``max |x|`` (NaN if any is NaN), without a d-sized temporary: for an aligned float array
    from its largest and smallest values (two reductions, no copy; NaN propagates through both),
    else block by block."""
    if x.size and x.dtype.kind == "f" and x.flags.aligned:
        hi, lo = float(x.max()), float(x.min())
        return hi if hi != hi else max(0.0, hi, -lo)
    peak = 0.0
    for start in range(0, x.size, BLOCK):
        m = float(np.abs(x[start : start + BLOCK]).max(initial=0.0))
        if m != m:
            return m
        peak = max(peak, m)
    return peak


def clip(p: Payload, max_norm: float) -> Payload:
    """``p`` scaled so that ``||to_dense(p)|| <= max_norm`` (``p`` itself when it already is):
    float values are scaled in their dtype (bfloat16 becomes float32), the other kinds' scale (LAQ's
    radius, QSGD's norm, sign-sparse's magnitude), all linear in the vector."""
    peak = payload_peak(p)
    if peak == 0.0:
        return p
    sq = 0.0  # sum of (v / peak)^2: no overflow for any finite values
    if p.kind in _SPARSE_KINDS:
        sq = float(np.sum(np.square(support(p)[1] / peak)))
    else:
        for start in range(0, p.dim, BLOCK):
            v = decode_block(p, start, min(p.dim, start + BLOCK)) / peak
            sq += float(v @ v)
    norm = peak * float(np.sqrt(sq))
    if norm <= max_norm:
        return p
    factor = max_norm / norm
    if p.values is not None:
        v = values_of(p)
        return dataclasses.replace(p, values=(v * factor).astype(v.dtype), value_format="")
    return dataclasses.replace(p, scale=float(p.scale) * factor)


class Aggregator:
    """``total`` (float64, d) and, for ``"replace"``, each worker's last upload as a payload.

    The caller must not modify a payload's arrays after handing it to :meth:`add`."""

    def __init__(self, num_workers: int, dim: int, absorb: str, keep_rows: bool = False) -> None:
        if absorb not in ("replace", "accumulate"):
            raise ValueError(f"absorb must be 'replace' or 'accumulate', got {absorb!r}")
        #: accumulate with ``keep_rows``: row m is worker m's sum of absorbed uploads (None: not kept)
        self.rows: np.ndarray | None = (
            np.zeros((num_workers, dim), dtype=np.float64) if keep_rows and absorb == "accumulate" else None
        )
        self.absorb = absorb
        self.num_workers = num_workers
        self.dim = dim
        self.total = np.zeros(dim, dtype=np.float64)
        #: replace: worker m's stored contribution (None: nothing yet, i.e. 0); accumulate: empty
        self.payloads: list[Payload | None] = [None] * num_workers if absorb == "replace" else []
        #: an upper bound of ``max |total|`` (inf: unknown; call :meth:`retighten` after writing ``total``)
        self.bound = 0.0
        self.peaks: list[float] = [0.0] * len(self.payloads)  # payload_peak of each stored payload

    def retighten(self) -> None:
        """Recompute :attr:`bound` from ``total`` (O(d))."""
        self.bound = peak_abs(self.total)

    def add(self, worker: int, payload: Payload, limit: float | None = None, peak: float | None = None) -> None:
        """Absorb one upload from ``worker``. With ``limit``: raise :class:`Overflow` and change
        nothing when a coordinate of the new ``total`` would be non-finite or exceed ``limit`` in
        magnitude (the arithmetic of an accepted upload is unchanged). ``peak``: the upload's
        :func:`payload_peak` when known. Checked only when the running bound ``max|total| +
        max|new| + max|old|`` does not already rule an overflow out: no extra pass over d for
        uploads of ordinary size."""
        if payload.dim != self.dim:
            raise ValueError(f"payload of dimension {payload.dim}, expected {self.dim}")
        if not 0 <= worker < self.num_workers:
            raise IndexError(f"worker {worker} out of range [0, {self.num_workers})")
        old = self.payloads[worker] if self.absorb == "replace" else None
        new_peak = old_peak = bound = 0.0
        if limit is not None:
            new_peak = payload_peak(payload) if peak is None else peak
            old_peak = self.peaks[worker] if old is not None else 0.0
            bound = self.bound + new_peak + old_peak
            if not bound <= limit and self.bound > 0:
                self.retighten()
                bound = self.bound + new_peak + old_peak
        add_payload(self.total, payload, old, None if limit is None or bound <= limit else limit)  # checks if needed
        self.bound = math.inf if limit is None else min(bound, limit)
        if self.rows is not None:
            add_payload(self.rows[worker], payload)  # after total: an upload total refused leaves the row too
        if self.absorb == "replace":
            self.payloads[worker] = compact(payload)
            self.peaks[worker] = new_peak

    def forget(self, worker: int) -> None:
        """Drop ``worker``'s stored contribution ("replace" only): ``total -= stored``, stored = 0.
        For rules whose aggregate is the round's uploads alone (``Algorithm.round_only``)."""
        old = self.payloads[worker] if self.absorb == "replace" else None
        if old is None:
            return
        if old.kind in _SPARSE_KINDS:
            idx, vals = support(old)
            self.total[idx] -= vals
        else:
            for start in range(0, self.dim, BLOCK):
                stop = min(self.dim, start + BLOCK)
                self.total[start:stop] -= decode_block(old, start, stop)
        self.payloads[worker] = None
        self.peaks[worker] = 0.0
        self.bound = math.inf  # recomputed when needed (retighten)

    def settle(self) -> None:
        """Called when a round closes, after its last upload: ``total`` is already the sum (a robust
        rule recomputes it here, :class:`psrv.robust.RobustAggregator`)."""

    def contribution(self, worker: int) -> np.ndarray:
        """Worker ``worker``'s stored contribution, decoded (float64; zeros before its first upload).
        "replace" keeps one; "accumulate" only with ``keep_rows`` (a copy of the row)."""
        if self.rows is not None:
            return self.rows[worker].copy()
        if self.absorb != "replace":
            raise ValueError("an accumulating aggregator keeps the running sum only, no per-worker contribution")
        p = self.payloads[worker]
        return np.zeros(self.dim, dtype=np.float64) if p is None else to_dense(p)

    @property
    def nbytes(self) -> int:
        """Bytes of every array held: ``total`` and the stored payloads."""
        rows = 0 if self.rows is None else self.rows.nbytes
        return self.total.nbytes + rows + sum(payload_nbytes(p) for p in self.payloads)


def _check(candidate: np.ndarray, limit: float | None) -> None:
    if limit is not None and candidate.size and not (np.abs(candidate) <= limit).all():  # NaN fails too
        bad = float(np.nanmax(np.abs(candidate))) if not np.isnan(candidate).all() else float("nan")
        raise Overflow(f"the aggregate would reach {bad:.3g}, beyond {limit:.3g}")


def add_payload(total: np.ndarray, new: Payload, old: Payload | None = None, limit: float | None = None) -> None:
    """``total += to_dense(new) - to_dense(old)`` in place (``total += to_dense(new)`` when ``old`` is
    None), touching only the support of sparse payloads and decoding dense ones block by block. The
    one absorb both the server and the workers' replicas run (psrv.replica), so their sums agree bit
    for bit. ``limit``: raise :class:`Overflow`, changing nothing, when a coordinate of the result
    would be non-finite or beyond ``limit`` in magnitude (sparse kinds check the touched coordinates
    before writing, dense ones every block in a first pass: O(d) time, no extra memory)."""
    if new.kind in _SPARSE_KINDS and (old is None or old.kind in _SPARSE_KINDS):
        idx, vals = support(new)
        if old is None:
            if limit is not None:
                candidate = total[idx] + vals
                _check(candidate, limit)
                total[idx] = candidate  # the same bits as total[idx] += vals (unique indices)
                return
            total[idx] += vals
            return
        old_idx, old_vals = support(old)
        union = np.union1d(idx, old_idx.astype(np.int64))
        diff = np.zeros(union.size, dtype=np.float64)
        diff[np.searchsorted(union, idx)] = vals
        diff[np.searchsorted(union, old_idx)] -= old_vals  # new - old, 0.0 - old where only old
        candidate = total[union] + diff  # the same bits as total[union] += diff
        _check(candidate, limit)
        total[union] = candidate
        return
    dim = total.size
    if limit is not None:
        for start in range(0, dim, BLOCK):  # a dry pass: nothing is written unless every block fits
            stop = min(dim, start + BLOCK)
            v = decode_block(new, start, stop)
            if old is not None:
                v -= decode_block(old, start, stop)
            _check(total[start:stop] + v, limit)
    for start in range(0, dim, BLOCK):
        stop = min(dim, start + BLOCK)
        v = decode_block(new, start, stop)
        if old is not None:
            v -= decode_block(old, start, stop)
        total[start:stop] += v
