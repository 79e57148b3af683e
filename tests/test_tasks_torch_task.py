"""psrv.tasks.torch_task: any nn.Module + loss as a task. The math first: the adapter's f_m and
∇f_m are the objective's (autograd on the assembled model; the hand-written mlp task on the same
weights), θ and the parameters share memory, initialisation is seeded, buffers stay local, and
the rows-as-indices data keep psrv's shards working."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from psrv import data
from psrv.tasks import make_task
from psrv.tasks import torch_task as tt
from psrv.tasks.torch_task import TorchAdapter, TorchSpec, index_datasets

N_FEATURES, HIDDEN, CLASSES = 6, 5, 3


class SmallNet(nn.Module):
    """An MLP with the mlp task's layout (W1, b1, W2, b2) plus a 1-D convolution, so the check
    covers more than linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(N_FEATURES, HIDDEN)
        self.l2 = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x)))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * N_FEATURES, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x[:, None, :])).flatten(1))


def _problem(n: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, N_FEATURES)), rng.integers(0, CLASSES, size=n)


def _reference(model: nn.Module, theta: np.ndarray, X, y, total: float, M: int, l2: float) -> tuple[float, np.ndarray]:
    """f_m and ∇f_m by plain autograd on a float64 copy of the model with θ written in."""
    ref = type(model)().double()
    vector_to_parameters(torch.from_numpy(theta), ref.parameters())
    out = ref(torch.from_numpy(X))
    value = nn.functional.cross_entropy(out, torch.from_numpy(y)) * len(X) / total
    grads = parameters_to_vector(torch.autograd.grad(value, list(ref.parameters()))).numpy()
    return float(value.detach()) + 0.5 * l2 / M * float(theta @ theta), grads + l2 / M * theta


@pytest.mark.parametrize("net", [SmallNet, ConvNet])
def test_gradient_equals_autograd_on_the_assembled_model(net: type[nn.Module]) -> None:
    torch.manual_seed(0)
    ad = TorchAdapter(TorchSpec(net(), nn.CrossEntropyLoss()), N_FEATURES, CLASSES, 0.3, 64, "t")
    X, y = _problem()
    theta = np.random.default_rng(1).normal(size=ad.dim)
    loss, grad = ad.local_loss_grad(theta, X, y, 50, 4)
    ref_loss, ref_grad = _reference(net(), theta, X, y, 50, 4, 0.3)
    assert grad.dtype == np.float64 and grad.shape == (ad.dim,)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-14)
    assert loss == pytest.approx(ref_loss, rel=1e-12)


@pytest.mark.parametrize("precision", [64, 32])
def test_gradient_equals_the_hand_written_mlp_task(precision: int) -> None:
    mlp = make_task("mlp", N_FEATURES, CLASSES, hidden=HIDDEN, l2=0.1, precision=precision)
    ad = TorchAdapter(TorchSpec(SmallNet(), nn.CrossEntropyLoss()), N_FEATURES, CLASSES, 0.1, precision, "t")
    assert ad.dim == mlp.dim
    X, y = _problem(40)
    theta = mlp.init_params(np.random.default_rng(2)) + 0.1 * np.random.default_rng(3).normal(size=mlp.dim)
    if precision == 32:
        theta = theta.astype(np.float32)  # what a worker computes at (the float32 broadcast)
    (l_mlp, g_mlp), (l_ad, g_ad) = mlp.local_loss_grad(theta, X, y, 100, 3), ad.local_loss_grad(theta, X, y, 100, 3)
    tol = 1e-12 if precision == 64 else 2e-6
    np.testing.assert_allclose(g_ad, g_mlp, rtol=tol, atol=tol)
    assert l_ad == pytest.approx(l_mlp, rel=tol)
    assert ad.loss(theta, X, y) == pytest.approx(mlp.loss(theta, X, y), rel=tol)
    assert ad.accuracy(theta, X, y) == mlp.accuracy(theta, X, y)


def test_parameters_are_views_of_one_flat_buffer() -> None:
    ad = TorchAdapter(TorchSpec(SmallNet(), nn.CrossEntropyLoss()), N_FEATURES, CLASSES, 0.0, 32, "t")
    X, y = _problem()
    theta = np.arange(ad.dim, dtype=np.float32) / ad.dim
    _, grad = ad.local_loss_grad(theta, X, y, len(X), 1)
    lo, hi = ad.flat.data_ptr(), ad.flat.data_ptr() + 4 * ad.dim
    for p in ad.model.parameters():  # every parameter and gradient lives in the flat buffers
        assert lo <= p.data_ptr() < hi
        assert ad.gflat.data_ptr() <= p.grad.data_ptr() < ad.gflat.data_ptr() + 4 * ad.dim
    np.testing.assert_array_equal(parameters_to_vector(ad.model.parameters()).detach().numpy(), theta)
    np.testing.assert_array_equal(grad, ad.gflat.numpy().astype(np.float64))


def test_chunks_add_up_to_the_whole_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    ad = TorchAdapter(TorchSpec(SmallNet(), nn.CrossEntropyLoss()), N_FEATURES, CLASSES, 0.0, 64, "t")
    X, y = _problem(23)
    theta = np.random.default_rng(4).normal(size=ad.dim)
    whole = ad.local_loss_grad(theta, X, y, 40, 2)
    monkeypatch.setattr(tt, "CHUNK", 5)
    chunked = ad.local_loss_grad(theta, X.copy(), y.copy(), 40, 2)
    np.testing.assert_allclose(chunked[1], whole[1], rtol=1e-12, atol=1e-15)
    assert chunked[0] == pytest.approx(whole[0], rel=1e-12)
    assert ad.loss(theta, X, y) == pytest.approx(whole[0] * 40 / 23, rel=1e-12)


def test_init_params_is_seeded_and_uses_torch_initialisers() -> None:
    a = TorchAdapter(TorchSpec(SmallNet(), nn.CrossEntropyLoss()), N_FEATURES, CLASSES, 0.0, 32, "t")
    torch.manual_seed(99)  # another factory state: init_params must not depend on it
    b = TorchAdapter(TorchSpec(SmallNet(), nn.CrossEntropyLoss()), N_FEATURES, CLASSES, 0.0, 32, "t")
    ta, tb = a.init_params(np.random.default_rng(7)), b.init_params(np.random.default_rng(7))
    np.testing.assert_array_equal(ta, tb)
    assert not np.array_equal(ta, a.init_params(np.random.default_rng(8)))
    bound = 1 / np.sqrt(N_FEATURES)  # nn.Linear's default: U(±1/sqrt(fan_in)) for W1 and b1
    assert np.abs(ta[: HIDDEN * N_FEATURES + HIDDEN]).max() <= bound
    state = torch.random.get_rng_state()
    a.init_params(np.random.default_rng(1))
    assert torch.equal(state, torch.random.get_rng_state())  # the global generator is left alone


def test_init_params_agree_across_processes() -> None:
    code = (
        "import numpy as np; from psrv.tasks import make_task; "
        "t = make_task('examples/my_model.py:make', 1, 2); "
        "print(t.init_params(np.random.default_rng(5)).tobytes().hex())"
    )
    here = make_task("examples/my_model.py:make", 1, 2).init_params(np.random.default_rng(5))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert bytes.fromhex(out.stdout.strip()) == here.tobytes()


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.bn, self.l2 = nn.Linear(N_FEATURES, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.bn(self.l1(x))))


def test_batchnorm_buffers_stay_local_and_evaluation_uses_batch_statistics() -> None:
    ad = TorchAdapter(TorchSpec(BNNet(), nn.CrossEntropyLoss()), N_FEATURES, CLASSES, 0.0, 64, "t")
    assert ad.dim == sum(p.numel() for p in BNNet().parameters())  # running statistics are not in θ
    X, y = _problem(30)
    theta = ad.init_params(np.random.default_rng(0))
    before = ad.model.bn.running_mean.clone()
    ad.local_loss_grad(theta, X, y, 30, 1)
    assert not torch.equal(before, ad.model.bn.running_mean)  # the worker's own statistics moved
    acc, loss = ad.accuracy(theta, X, y), ad.loss(theta, X, y)
    with torch.no_grad():
        ad.model.bn.running_mean.fill_(1e6)  # whatever this process's statistics: evaluation ignores them
    assert ad.accuracy(theta, X, y) == acc and ad.loss(theta, X, y) == pytest.approx(loss, rel=1e-12)


def test_own_datasets_become_index_rows_that_shard_and_fetch() -> None:
    g = torch.Generator().manual_seed(0)
    Xt, yt = torch.randn(60, N_FEATURES, generator=g, dtype=torch.float64), torch.arange(60) % CLASSES
    train = torch.utils.data.TensorDataset(Xt[:50], yt[:50])
    test = [(Xt[i], int(yt[i])) for i in range(50, 60)]  # any indexable dataset of (input, target) pairs
    rows_train, rows_test = index_datasets(train, test, "own")
    assert rows_train.X.shape == (50, 1) and rows_test.X[:, 0].tolist() == list(range(50, 60))
    assert rows_train.n_classes == CLASSES and rows_train.y.tolist() == yt[:50].tolist()
    parts = [data.shard(rows_train, i, 3, "dirichlet", 1) for i in range(3)]  # label splits work on the rows
    assert sorted(np.concatenate([p.X[:, 0] for p in parts]).tolist()) == list(range(50))

    ad = TorchAdapter(TorchSpec(SmallNet(), nn.CrossEntropyLoss(), train, test), 1, CLASSES, 0.0, 64, "own")
    theta = np.random.default_rng(5).normal(size=ad.dim)
    rows = np.array([[3.0], [55.0], [0.0], [51.0]])  # train and test samples mixed, in this order
    loss, grad = ad.local_loss_grad(theta, rows, np.zeros(4), 10, 1)
    pick = [3, 55, 0, 51]
    ref_loss, ref_grad = _reference(SmallNet(), theta, Xt[pick].numpy(), yt[pick].numpy(), 10, 1, 0.0)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-14)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    with pytest.raises(ValueError, match="sample indices"):
        ad.local_loss_grad(theta, np.array([[60.0]]), np.zeros(1), 10, 1)


def test_unlabelled_own_data_and_regression_accuracy() -> None:
    seqs = torch.utils.data.TensorDataset(torch.zeros(8, 3), torch.zeros(8, 3))  # non-scalar targets
    rows, _ = index_datasets(seqs, None, "seq")
    assert rows.n_classes == 0 and rows.y.dtype == np.float64
    # float targets: accuracy is R², as for linreg
    net = nn.Sequential(nn.Linear(N_FEATURES, 1), nn.Flatten(0))
    ad = TorchAdapter(TorchSpec(net, nn.MSELoss()), N_FEATURES, 0, 0.0, 64, "reg")
    X = np.random.default_rng(0).normal(size=(30, N_FEATURES))
    w = np.random.default_rng(1).normal(size=N_FEATURES + 1)
    theta = w  # weight row then bias: y = X w + b exactly
    y = X @ w[:-1] + w[-1]
    assert ad.accuracy(theta, X, y) == 1.0
    assert ad.accuracy(np.zeros_like(theta), X, y) < 0.5


def test_sequence_outputs_count_accuracy_per_position() -> None:
    assert tt._hits(torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]), torch.tensor([[1, 1]])) == 0.5  # (B, T, V)
    assert tt._hits(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 0])) == 1.0  # (B, C)
    assert tt._hits(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long)) == 1.0  # (B, C, L)
