from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from psrv.data import (
    BUILTINS,
    SPLITS,
    DataError,
    Dataset,
    builtin_task_hint,
    from_arrays,
    load,
    load_builtin,
    load_file,
    parse_split,
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
    with pytest.raises(DataError, match="mnist, digits, breast_cancer, linreg-hetero"):
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


@pytest.mark.parametrize("split", [s for s in SPLITS if s != "contiguous"])  # contiguous: no randomness
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


def test_dirichlet_alpha_in_the_split_name(mnist: Dataset) -> None:
    """``dirichlet:ALPHA`` (the --split value) is the Dirichlet split of that concentration, whatever alpha says."""
    named = shard_indices(len(mnist), mnist.y, 10, "dirichlet:0.1", seed=4)
    given = shard_indices(len(mnist), mnist.y, 10, "dirichlet", seed=4, alpha=0.1)
    default = shard_indices(len(mnist), mnist.y, 10, "dirichlet", seed=4)  # alpha 0.5
    for a, b in zip(named, given, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(named, default, strict=True))
    assert parse_split("dirichlet:0.1", alpha=7.0) == ("dirichlet", 0.1)
    assert parse_split("iid") == ("iid", 0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_shards": 0}, "num_shards must be"),
        ({"num_shards": 13}, "exceeds the number of samples"),
        ({"split": "random"}, "unknown split 'random'"),
        ({"index": 4}, "out of range"),
        ({"index": -1}, "out of range"),
        ({"split": "dirichlet", "alpha": 0.0}, "alpha must be a finite number > 0"),
        ({"split": "dirichlet:0"}, "alpha must be a finite number > 0"),
        ({"split": "dirichlet:nan"}, "alpha must be a finite number > 0"),
        ({"split": "dirichlet:inf"}, "alpha must be a finite number > 0"),
        ({"split": "dirichlet:x"}, "ALPHA must be a number"),
        ({"split": "iid:0.1"}, "unknown split 'iid:0.1'"),
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


# ----------------------------------------------------------------------------- regression targets


def test_csv_and_npz_regression_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(20, 3)), rng.normal(size=20)
    _write_csv(tmp_path / "r.csv", X, y, header=True)
    np.savez(tmp_path / "r.npz", X=X, y=y)
    for got in (load_file(tmp_path / "r.csv", regression=True), load(str(tmp_path / "r.npz"), regression=True)):
        assert got.n_classes == 0 and got.is_regression and got.y.dtype == np.float64
        np.testing.assert_array_equal(got.X, X)
        np.testing.assert_array_equal(got.y, y)
    # The default stays classification: the same file is rejected for its real-valued labels.
    with pytest.raises(DataError, match="labels must be integers"):
        load_file(tmp_path / "r.csv")


def test_regression_label_column_and_integer_targets(tmp_path: Path) -> None:
    (tmp_path / "f.csv").write_text("target,a,b\n-3,0.5,2\n7,1.5,3\n7,1,1\n")
    ds = load_file(tmp_path / "f.csv", label_column=0, regression=True)
    np.testing.assert_array_equal(ds.X, [[0.5, 2], [1.5, 3], [1, 1]])
    assert ds.y.dtype == np.float64 and ds.y.tolist() == [-3.0, 7.0, 7.0] and ds.n_classes == 0
    one_value = from_arrays(np.ones((3, 2)), np.full(3, 2.5), regression=True)  # a constant target is allowed
    assert one_value.n_classes == 0 and one_value.subset(np.array([2, 0])).n_classes == 0


BAD_REGRESSION = {
    "NaN target": (np.ones((3, 2)), np.array([1.0, np.nan, 2.0]), "must be finite, found nan.*first at sample 1"),
    "Inf target": (np.ones((2, 2)), np.array([1.0, -np.inf]), "must be finite, found -inf"),
    "string target": (np.ones((2, 2)), np.array(["a", "b"]), "targets y must be numbers"),
    "2-D target": (np.ones((2, 2)), np.ones((2, 1)), "y must be 1-D"),
    "length mismatch": (np.ones((3, 2)), np.ones(2), "X has 3 rows but y has 2"),
    "NaN in X": (np.array([[1.0, np.nan]]), np.ones(1), "X contains non-finite"),
    "no samples": (np.ones((0, 2)), np.ones(0), "no samples"),
}


@pytest.mark.parametrize("case", BAD_REGRESSION)
def test_regression_validation(case: str) -> None:
    X, y, match = BAD_REGRESSION[case]
    with pytest.raises(DataError, match=match):
        from_arrays(X, y, regression=True)


def test_regression_csv_nan_target_names_file(tmp_path: Path) -> None:
    (tmp_path / "r.csv").write_text("1,2,0.5\n3,4,nan\n")
    with pytest.raises(DataError, match="must be finite") as err:
        load_file(tmp_path / "r.csv", regression=True)
    assert str(tmp_path / "r.csv") in str(err.value)


def test_regression_flag_on_classification_builtin() -> None:
    with pytest.raises(DataError, match="digits is a classification dataset"):
        load("digits", regression=True)
    assert load("linreg-hetero", regression=True).n_classes == 0
    assert load("linreg-hetero").n_classes == 0  # a built-in knows its kind


def test_regression_splits() -> None:
    ds = from_arrays(np.arange(40.0).reshape(20, 2), np.linspace(-1, 1, 20)[::-1].copy(), regression=True)
    train, test = train_test_split(ds, 0.25, seed=0)
    assert (len(train), len(test)) == (15, 5) and train.n_classes == test.n_classes == 0
    parts = [shard(ds, i, 4, "noniid", seed=0) for i in range(4)]  # sorted by target value
    assert all(a.y.max() <= b.y.min() for a, b in zip(parts, parts[1:], strict=False))
    assert sum(len(shard(ds, i, 3, "iid", seed=1)) for i in range(3)) == 20
    with pytest.raises(DataError, match="dirichlet split needs class labels"):
        shard(ds, 0, 4, "dirichlet")


# ----------------------------------------------------------------------------- contiguous split, linreg-hetero


def test_contiguous_split_is_stored_order() -> None:
    parts = shard_indices(23, np.zeros(23), 5, "contiguous", seed=0)
    assert [p.tolist() for p in parts] == [
        list(range(0, 5)),
        *[list(range(a, a + 5)) for a in (5, 10)],
        list(range(15, 19)),
        list(range(19, 23)),
    ]
    again = shard_indices(23, np.ones(23), 5, "contiguous", seed=9)  # ignores seed and labels
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    ds = _toy(n=12)
    np.testing.assert_array_equal(shard(ds, 2, 4, "contiguous").X, ds.X[6:9])


def test_train_test_split_zero_keeps_order() -> None:
    ds = _toy(n=50)
    train, test = train_test_split(ds, 0.0, seed=123)
    np.testing.assert_array_equal(train.X, ds.X)
    np.testing.assert_array_equal(train.y, ds.y)
    assert len(test) == 0
    part, _ = train_test_split(ds, 0.3, seed=4)  # with a test part the kept rows stay in stored order
    rows = [int(np.flatnonzero((ds.X == r).all(axis=1))[0]) for r in part.X]
    assert rows == sorted(rows)


def test_linreg_hetero_builtin() -> None:
    ds = load_builtin("linreg-hetero")
    assert (len(ds), ds.n_features, ds.n_classes) == (500, 50, 0)
    assert ds.X.dtype == ds.y.dtype == np.float64 and ds.X.flags.c_contiguous
    again = load("linreg-hetero")
    np.testing.assert_array_equal(ds.X, again.X)  # fixed seed: identical on every call / host
    np.testing.assert_array_equal(ds.y, again.y)
    assert builtin_task_hint("linreg-hetero") == "linreg"
    assert all(builtin_task_hint(name) is None for name in BUILTINS if name != "linreg-hetero")
    assert builtin_task_hint("my.csv") is None
