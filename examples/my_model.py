"""A user's own model and data for psrv: ``psrv run --task examples/my_model.py:make``.

The factory takes no arguments and returns a ``psrv.TorchSpec``: the model, the loss (the mean
over the batch), and train/test ``torch.utils.data.Dataset`` s of (input, target) pairs. psrv calls
it in every process (server, workers, evaluator) under ``torch.manual_seed(0)``, so the random
data below is the same everywhere. Leave ``train``/``test`` out to train on psrv's own data
(``--data mnist``, a CSV file, ...), given to the model as rows of float features.

    python -m psrv run --task examples/my_model.py:make --algorithm gd,laq --workers 4 --rounds 50 --lr 0.5
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from psrv import TorchSpec


class TwoMoonsNet(nn.Module):
    """A small MLP with a BatchNorm layer (its running statistics stay local to each process)."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.BatchNorm1d(hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _moons(n: int, generator: torch.Generator) -> TensorDataset:
    """Two interleaving half circles with noise; labels 0/1."""
    t = torch.rand(n, generator=generator) * torch.pi
    label = torch.randint(0, 2, (n,), generator=generator)
    x = torch.stack([torch.cos(t), torch.sin(t)], dim=1)
    x = torch.where(label[:, None] == 1, torch.stack([1 - x[:, 0], 0.5 - x[:, 1]], dim=1), x)
    x = x + 0.1 * torch.randn(n, 2, generator=generator)
    return TensorDataset(x, label)


def make() -> TorchSpec:
    g = torch.Generator().manual_seed(1234)
    return TorchSpec(model=TwoMoonsNet(), loss=nn.CrossEntropyLoss(), train=_moons(800, g), test=_moons(200, g))
