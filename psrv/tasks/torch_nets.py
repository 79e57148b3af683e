"""Built-in torch networks, registered as tasks (all through :mod:`psrv.tasks.torch_task`):

- ``cnn``: a LeNet-5–style convolutional network (LeCun, Bottou, Bengio, Haffner, "Gradient-Based
  Learning Applied to Document Recognition", Proc. IEEE 1998) for square grey-scale images given as
  flat rows (``--data mnist``: 28×28, ``--data digits``: 8×8; the model reshapes). Two convolutions
  (6 and 16 channels) each followed by 2×2 max pooling, then 120 → 84 → classes, with ReLU rather
  than the paper's scaled tanh. On 28×28 the layers are LeNet-5's (5×5 kernels, the first padded),
  61,706 parameters; on 8×8, 3×3 kernels padded to keep the size.
- ``wide``: a fully connected ReLU network, n_features → width (× ``depth`` hidden layers) →
  classes, for sizing experiments: ``-t width=3072`` on ``--data synthetic`` (256 features) has
  d = 10,260,490 ≈ 1e7.
- ``charlm``: a small character-level Transformer language model (pre-LayerNorm decoder blocks,
  Vaswani et al., "Attention Is All You Need", NeurIPS 2017; the GPT-2 block layout) trained on
  source files of Python's own standard library (read from ``sysconfig``'s stdlib path; nothing is
  downloaded). It brings its own data: each psrv row is the start of a window of the text, and the
  window length is the ``context`` option, so the data (rows, shards) do not depend on the options.
  Accuracy is next-character accuracy.

Every task takes ``l2`` (default 0) and ``precision`` (32 or 64) besides its own options.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from psrv.data import Dataset
from psrv.tasks.base import as_int
from psrv.tasks.torch_task import TorchAdapter, TorchSpec, TorchTask, index_datasets


# ---------------------------------------------------------------------------------- cnn
class LeNet(nn.Module):
    """LeNet-5–style CNN on flat rows of a side × side image."""

    def __init__(self, side: int, n_classes: int):
        super().__init__()
        self.side = side
        big = side >= 16
        self.conv1 = nn.Conv2d(1, 6, 5 if big else 3, padding=2 if big else 1)
        self.conv2 = nn.Conv2d(6, 16, 5 if big else 3, padding=0 if big else 1)
        with torch.no_grad():
            n = self._features(torch.zeros(1, 1, side, side)).shape[1]
        self.fc1, self.fc2, self.fc3 = nn.Linear(n, 120), nn.Linear(120, 84), nn.Linear(84, n_classes)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._features(x.reshape(-1, 1, self.side, self.side))
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


@dataclass(frozen=True)
class CNN(TorchTask):
    n_features: int
    n_classes: int
    l2: float = 0.0
    precision: int = 32
    device: str = field(default="cpu", compare=False)  # not a task option: make_task(device=...)
    _adapter: TorchAdapter = field(init=False, repr=False, compare=False)
    name: ClassVar[str] = "cnn"

    def _set_options(self) -> None:
        side = math.isqrt(self.n_features)
        if side * side != self.n_features or side < 4:
            raise ValueError(f"cnn: needs square images of side >= 4 as rows, got {self.n_features} features")
        if self.n_classes < 2:
            raise ValueError("cnn: needs class labels")

    def spec(self) -> TorchSpec:
        return TorchSpec(LeNet(math.isqrt(self.n_features), self.n_classes), nn.CrossEntropyLoss())


# ---------------------------------------------------------------------------------- wide
@dataclass(frozen=True)
class Wide(TorchTask):
    n_features: int
    n_classes: int
    width: int = 256
    depth: int = 2
    l2: float = 0.0
    precision: int = 32
    device: str = field(default="cpu", compare=False)  # not a task option: make_task(device=...)
    _adapter: TorchAdapter = field(init=False, repr=False, compare=False)
    name: ClassVar[str] = "wide"
    default_data: ClassVar[str | None] = "synthetic"

    def _set_options(self) -> None:
        object.__setattr__(self, "width", as_int("wide", "width", self.width, 1))
        object.__setattr__(self, "depth", as_int("wide", "depth", self.depth, 1))

    def spec(self) -> TorchSpec:
        layers: list[nn.Module] = []
        n = self.n_features
        for _ in range(self.depth):
            layers += [nn.Linear(n, self.width), nn.ReLU()]
            n = self.width
        out = max(self.n_classes, 1)
        layers.append(nn.Linear(n, out))
        if self.n_classes == 0:  # regression: one output, squared error
            return TorchSpec(nn.Sequential(*layers, nn.Flatten(0)), nn.MSELoss())
        return TorchSpec(nn.Sequential(*layers), nn.CrossEntropyLoss())


# ---------------------------------------------------------------------------------- charlm
#: Standard-library modules the text is made of (plain, stable, mostly prose-like code); a file
#: missing from this Python is skipped. The text is cut at TEXT_CHARS characters.
STDLIB_FILES = ("textwrap.py", "string.py", "heapq.py", "fnmatch.py", "shlex.py", "functools.py", "contextlib.py")
TEXT_CHARS = 100_000
STRIDE = 64  # characters between the starts of consecutive windows (psrv rows)
MAX_CONTEXT = 256  # the longest window a row may start (so every row is valid for every context)
TEST_FRACTION = 0.1  # the last tenth of the windows (unseen text) is the test set
VOCAB = 97  # printable ASCII 32..126, newline, and one code for everything else


def stdlib_text() -> str:
    """The training text: ``STDLIB_FILES`` of this Python, concatenated, at most TEXT_CHARS."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = [(root / f).read_text(encoding="utf-8") for f in STDLIB_FILES if (root / f).is_file()]
    text = "\n".join(parts)[:TEXT_CHARS]
    if len(text) < 4 * MAX_CONTEXT:
        raise ValueError(f"charlm: too little text in {root} ({len(text)} characters)")
    return text


def encode(text: str) -> torch.Tensor:
    """Characters -> codes: 32..126 -> 0..94, newline -> 95, anything else -> 96."""
    b = np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8).astype(np.int64)
    codes = np.where((b >= 32) & (b <= 126), b - 32, 96)
    codes[b == 10] = 95
    return torch.from_numpy(codes)


def windows(codes: torch.Tensor, starts: np.ndarray, context: int) -> torch.utils.data.TensorDataset:
    """Item i: (codes[s:s+T], codes[s+1:s+T+1]) with s = starts[i] and T = ``context`` (materialised:
    a TensorDataset is indexed a whole batch at a time)."""
    w = codes[torch.from_numpy(starts)[:, None] + torch.arange(context + 1)]
    return torch.utils.data.TensorDataset(w[:, :-1].contiguous(), w[:, 1:].contiguous())


def _windows() -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    codes = encode(stdlib_text())
    starts = np.arange(0, len(codes) - MAX_CONTEXT - 1, STRIDE, dtype=np.int64)
    n_test = max(1, round(TEST_FRACTION * len(starts)))
    return codes, starts[:-n_test], starts[-n_test:]


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Token + learned position embeddings, ``layers`` pre-LN blocks, final LayerNorm, linear head."""

    def __init__(self, vocab: int, context: int, d_model: int, layers: int, heads: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.Sequential(*[Block(d_model, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        return self.head(self.ln(self.blocks(x)))  # (B, T, vocab)


def _lm_loss(out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Mean next-character cross-entropy (per sample: the mean over its T positions)."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), tgt.reshape(-1))


@dataclass(frozen=True)
class CharLM(TorchTask):
    n_features: int = 1
    n_classes: int = 0
    context: int = 64
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    l2: float = 0.0
    precision: int = 32
    device: str = field(default="cpu", compare=False)  # not a task option: make_task(device=...)
    _adapter: TorchAdapter = field(init=False, repr=False, compare=False)
    name: ClassVar[str] = "charlm"
    default_data: ClassVar[str | None] = "charlm"

    def _set_options(self) -> None:
        for opt in ("context", "d_model", "layers", "heads"):
            object.__setattr__(self, opt, as_int("charlm", opt, getattr(self, opt), 1))
        if self.context > MAX_CONTEXT:
            raise ValueError(f"charlm: context must be <= {MAX_CONTEXT}, got {self.context}")
        if self.d_model % self.heads:
            raise ValueError(f"charlm: d_model ({self.d_model}) must be a multiple of heads ({self.heads})")

    def spec(self) -> TorchSpec:
        codes, train, test = _windows()
        model = CharTransformer(VOCAB, self.context, self.d_model, self.layers, self.heads)
        return TorchSpec(model, _lm_loss, windows(codes, train, self.context), windows(codes, test, self.context))

    @staticmethod
    def own_data() -> tuple[Dataset, Dataset | None]:
        """The rows every process shards: one per window start (independent of the options)."""
        _, train, test = _windows()
        return index_datasets(range(len(train)), range(len(test)), "charlm")  # only the lengths matter: unlabelled
