from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from psrv.data import (
    SPLITS,
    DataError,
    Dataset,
    load,
    load_builtin,
    load_file,
    shard,
    shard_indices,
    train_test_split,
)


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_builtin("mnist")


def _toy(n: int = 12, d: int = 3, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    X = np.round(rng.normal(size=(n, d)), 6)
    y = np.arange(n) % 3
    return Dataset(X, y.astype(np.int64), 3, "toy")


# ----------------------------------------------------------------------------- builtins


def test_mnist_builtin(mnist: Dataset) -> None:
    assert (len(mnist), mnist.n_features, mnist.n_classes) == (5000, 784, 10)
    assert mnist.X.dtype == np.float64 and mnist.X.flags.c_contiguous
    assert mnist.y.dtype == np.int64
    assert mnist.X.min() == 0.0 and mnist.X.max() == 1.0
    assert set(np.unique(mnist.y)) == set(range(10))


def test_other_builtins() -> None:
    digits = load_builtin("digits")
    assert digits.X.shape == (1797, 64) and digits.X.max() == 1.0 and digits.n_classes == 10
    bc = load("breast_cancer")
    assert bc.X.shape == (569, 30) and bc.n_classes == 2
    np.testing.assert_allclose(bc.X.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(bc.X.std(axis=0), 1.0, rtol=1e-12)


def test_unknown_builtin_lists_known() -> None:
    with pytest.raises(DataError, match="mnist, digits, breast_cancer"):
        load_builtin("cifar")
    with pytest.raises(DataError, match="neither a built-in"):
        load("cifar")


def test_subset() -> None:
    ds = _toy()
    sub = ds.subset(np.array([3, 1]))
    np.testing.assert_array_equal(sub.X, ds.X[[3, 1]])
    np.testing.assert_array_equal(sub.y, [0, 1])
    assert sub.n_classes == 3 and sub.X.flags.c_contiguous


# ----------------------------------------------------------------------------- splitting


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("num_shards", [1, 7, 10])
def test_split_is_exact_partition(mnist: Dataset, split: str, num_shards: int) -> None:
    parts = shard_indices(len(mnist), mnist.y, num_shards, split, seed=3)
    assert len(parts) == num_shards and all(len(p) > 0 for p in parts)
    allidx = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(allidx), np.arange(len(mnist)))  # disjoint + complete
    assert all(p.dtype == np.int64 for p in parts)


@pytest.mark.parametrize("split", SPLITS)
def test_split_deterministic_and_seed_dependent(split: str) -> None:
    labels = np.random.default_rng(0).integers(0, 10, size=1000)

    def run(seed: int) -> list[np.ndarray]:
        return shard_indices(1000, labels, 7, split, seed)

    for a, b in zip(run(1), run(1), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(run(1), run(2), strict=True))


def test_iid_sizes_balanced() -> None:
    sizes = [len(p) for p in shard_indices(1003, np.zeros(1003), 10, "iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_noniid_few_classes_per_shard(mnist: Dataset) -> None:
    parts = shard_indices(len(mnist), mnist.y, 10, "noniid", seed=0)
    assert max(len(np.unique(mnist.y[p])) for p in parts) <= 2
    iid = shard_indices(len(mnist), mnist.y, 10, "iid", seed=0)
    assert min(len(np.unique(mnist.y[p])) for p in iid) == 10


def test_dirichlet_skew_and_nonempty(mnist: Dataset) -> None:
    # Tiny alpha: almost every class lands on one shard, yet no shard is empty.
    parts = shard_indices(20, np.arange(20) % 2, 20, "dirichlet", seed=0, alpha=1e-3)
    assert [len(p) for p in parts] == [1] * 20
    skewed = shard_indices(len(mnist), mnist.y, 10, "dirichlet", seed=0, alpha=0.1)
    flat = shard_indices(len(mnist), mnist.y, 10, "dirichlet", seed=0, alpha=1000.0)

    def classes(ps: list[np.ndarray]) -> float:
        return float(np.mean([len(np.unique(mnist.y[p])) for p in ps]))

    assert classes(skewed) < classes(flat) == 10


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_shards": 0}, "num_shards must be"),
        ({"num_shards": 13}, "exceeds the number of samples"),
        ({"split": "random"}, "unknown split 'random'"),
        ({"index": 4}, "out of range"),
        ({"index": -1}, "out of range"),
        ({"split": "dirichlet", "alpha": 0.0}, "alpha must be > 0"),
    ],
)
def test_shard_errors(kwargs: dict, match: str) -> None:
    args = {"index": 0, "num_shards": 4, "split": "iid", "seed": 0} | kwargs
    with pytest.raises(DataError, match=match):
        shard(_toy(), **args)


def test_shard_matches_indices() -> None:
    ds = _toy()
    idx = shard_indices(len(ds), ds.y, 4, "noniid", seed=5)[2]
    part = shard(ds, 2, 4, "noniid", seed=5)
    np.testing.assert_array_equal(part.X, ds.X[idx])
    np.testing.assert_array_equal(part.y, ds.y[idx])


def test_train_test_split() -> None:
    ds = _toy(n=100)
    train, test = train_test_split(ds, 0.2, seed=1)
    assert (len(train), len(test)) == (80, 20)
    rows = np.concatenate([train.X, test.X])
    assert len(np.unique(rows, axis=0)) == 100  # disjoint and complete
    again = train_test_split(ds, 0.2, seed=1)[1]
    np.testing.assert_array_equal(again.X, test.X)
    assert not np.array_equal(train_test_split(ds, 0.2, seed=2)[1].X, test.X)
    train0, test0 = train_test_split(ds, 0.0, seed=1)
    assert len(train0) == 100 and test0.X.shape == (0, 3) and test0.n_classes == 3
    with pytest.raises(DataError, match="test_fraction"):
        train_test_split(ds, 1.0, seed=1)


# ----------------------------------------------------------------------------- files


def _write_csv(path: Path, X: np.ndarray, y: np.ndarray, header: bool) -> None:
    table = np.column_stack([X, y])
    head = ",".join([f"x{i}" for i in range(X.shape[1])] + ["label"]) if header else ""
    np.savetxt(path, table, delimiter=",", fmt="%.17g", header=head, comments="")


def test_csv_and_npz_round_trip(tmp_path: Path) -> None:
    ds = _toy(n=30, d=4)
    np.savez(tmp_path / "d.npz", X=ds.X, y=ds.y)
    _write_csv(tmp_path / "plain.csv", ds.X, ds.y, header=False)
    _write_csv(tmp_path / "head.csv", ds.X, ds.y, header=True)
    loaded = [
        load_file(tmp_path / "d.npz"),
        load(str(tmp_path / "plain.csv")),
        load_file(tmp_path / "head.csv"),
    ]
    for got in loaded:
        np.testing.assert_array_equal(got.X, ds.X)
        np.testing.assert_array_equal(got.y, ds.y)
        assert got.n_classes == 3 and got.X.dtype == np.float64 and got.y.dtype == np.int64
    assert loaded[0].name == "d"


def test_csv_label_column(tmp_path: Path) -> None:
    (tmp_path / "f.csv").write_text("label,a,b\n1,0.5,2\n0,1.5,3\n")
    ds = load_file(tmp_path / "f.csv", label_column=0)
    np.testing.assert_array_equal(ds.X, [[0.5, 2], [1.5, 3]])
    np.testing.assert_array_equal(ds.y, [1, 0])


def test_integer_valued_float_labels_ok(tmp_path: Path) -> None:
    (tmp_path / "f.csv").write_text("1,2,3.0\n4,5,0.0\n")
    assert load_file(tmp_path / "f.csv").n_classes == 4  # labels kept as given: max + 1


def _npz(**arrays: np.ndarray) -> Callable[[Path], None]:
    return lambda p: np.savez(p, **arrays)


def _text(s: str) -> Callable[[Path], None]:
    return lambda p: p.write_text(s)


X4, Y4 = np.ones((4, 2)), np.array([0, 1, 0, 1])
BAD_FILES = {
    "unknown extension": ("d.txt", _text("1,2\n"), "unsupported file extension '.txt'"),
    "garbage npz": ("d.npz", _text("not a zip"), "not an .npz archive"),
    "truncated npz": ("d.npz", _text("PK\x03\x04junk"), "cannot read as .npz"),
    "npz missing y": ("d.npz", _npz(X=X4), "missing array 'y'"),
    "npz object X": ("d.npz", _npz(X=np.array(["a", "b"]), y=Y4[:2]), "X must be numeric"),
    "X not 2-D": ("d.npz", _npz(X=np.ones(4), y=Y4), "X must be 2-D"),
    "length mismatch": ("d.npz", _npz(X=X4, y=Y4[:3]), "X has 4 rows but y has 3"),
    "NaN in X": ("d.npz", _npz(X=np.array([[1, np.nan], [1, 2]]), y=Y4[:2]), "non-finite"),
    "Inf in X": ("d.csv", _text("1,inf,0\n1,2,1\n"), "non-finite"),
    "empty npz": ("d.npz", _npz(X=np.ones((0, 2)), y=np.zeros(0, int)), "no samples"),
    "non-integer label": ("d.csv", _text("1,2,0\n3,4,1.5\n"), "labels must be integers.*1.5"),
    "negative label": ("d.csv", _text("1,2,0\n3,4,-1\n"), "non-negative"),
    "one class": ("d.csv", _text("1,2,1\n3,4,1\n"), "at least 2 classes"),
    "non-numeric cell": ("d.csv", _text("1,2,0\n3,abc,1\n"), "malformed CSV.*'abc'"),
    "ragged rows": ("d.csv", _text("1,2,0\n3,4\n"), "malformed CSV.*number of columns"),
    "empty csv": ("d.csv", _text(""), "no data rows"),
    "header only": ("d.csv", _text("a,b,label\n"), "no data rows"),
    "label column only": ("d.csv", _text("0\n1\n"), "no feature columns"),
    "bad label_column": ("d.csv", _text("1,2,0\n3,4,1\n"), None),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files(tmp_path: Path, case: str) -> None:
    fname, write, match = BAD_FILES[case]
    path = tmp_path / fname
    write(path)
    kwargs = {"label_column": 5} if match is None else {}
    with pytest.raises(DataError, match=match or "label_column 5 out of range") as err:
        load_file(path, **kwargs)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_file(tmp_path / "nope.csv")
