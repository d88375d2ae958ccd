"""Stage 3's classifier: a second-order factorization machine (Rendle 2010) on sparse SAE activations.

    y(x) = w0 + sum_i w_i x_i + sum_{i<j} <v_i, v_j> x_i x_j

The pairwise sum costs O(k nnz) in Rendle's form (2010, Lemma 3.1)
    sum_{i<j} <v_i, v_j> x_i x_j = 0.5 * sum_f [(sum_i v_if x_i)^2 - sum_i v_if^2 x_i^2]
and both inner sums are `embedding_bag(mode="sum", per_sample_weights=...)` over a row's non-zeros,
so no dense [n_rows, n_features] input ever exists, on CPU or GPU.

Why not a library: the FM packages are file-in/file-out C++ tools without PyTorch tensors or
autograd (libFM, xLearn), unmaintained Cython builds (fastFM), or field-categorical CTR models
whose input is one id per field, not a weighted sparse row of tens of thousands of latents
(pytorch-fm, DeepCTR-Torch). None takes torch sparse input on a GPU; the model is the 20 lines
below, and the tests check its pairwise term against the naive double sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from analyze.stage3.data import SPLITS, FmData
from store import UsageError
from store.settings import Settings


@dataclass(frozen=True)
class FmSettings(Settings):
    embedding: int = 20                   # k; the paper uses 20 (5 and 50 as diagnostics)
    epochs: int = 20
    lr: float = 1e-3                      # Adam
    batch_size: int = 32
    init_std: float = 0.1                 # N(0, init_std) for the embeddings (libFM's default)
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"                  # auto (cuda when available) | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        for name in ("embedding", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"FM {name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or not self.init_std > 0 or self.weight_decay < 0:
            raise UsageError(f"FM lr and init_std must be > 0 and weight_decay >= 0; got lr={self.lr}, "
                             f"init_std={self.init_std}, weight_decay={self.weight_decay}")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise UsageError(f"FM device must be auto, cpu or cuda[:N], got {self.device!r}")


    def resolved_device(self) -> torch.device:
        """The device training runs on."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"FM device {self.device} asked for, but torch sees no CUDA device")
        return torch.device(self.device)


class FactorizationMachine(nn.Module):
    """Logit of a second-order FM over bags of (column id, value) pairs."""

    def __init__(self, n_features: int, embedding: int, init_std: float = 0.1,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.w0 = nn.Parameter(torch.zeros(1))
        self.w = nn.Parameter(torch.zeros(n_features, 1))                          # [n_features, 1]
        self.V = nn.Parameter(torch.randn(n_features, embedding, generator=generator) * init_std)  # [n_features, k]

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Logits [n_bags] for bags given as embedding_bag input (indices [nnz], offsets [n_bags], values [nnz])."""
        linear = F.embedding_bag(indices, self.w, offsets, mode="sum", per_sample_weights=values)[:, 0]
        return self.w0 + linear + self.pairwise(indices, offsets, values)

    def pairwise(self, indices: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """sum_{i<j} <v_i, v_j> x_i x_j per bag in O(k nnz): [n_bags]."""
        sum_vx = F.embedding_bag(indices, self.V, offsets, mode="sum", per_sample_weights=values)    # [n_bags, k]
        sum_v2x2 = F.embedding_bag(indices, self.V * self.V, offsets, mode="sum",
                                   per_sample_weights=values * values)                              # [n_bags, k]
        return 0.5 * (sum_vx * sum_vx - sum_v2x2).sum(-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The weights as plain CPU tensors (for safetensors)."""
        return {"w0": self.w0.detach().cpu(), "w": self.w.detach().cpu()[:, 0], "V": self.V.detach().cpu()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "FactorizationMachine":
        n_features, embedding = tensors["V"].shape
        fm = cls(n_features, embedding)
        with torch.no_grad():
            fm.w0.copy_(tensors["w0"])
            fm.w.copy_(tensors["w"][:, None])
            fm.V.copy_(tensors["V"])
        return fm


@dataclass(frozen=True)
class EpochStats:
    epoch: int                            # 1-based
    train_loss: float
    val_loss: float
    val_acc: float


@dataclass(frozen=True, eq=False)
class FmFit:
    model: FactorizationMachine           # on CPU, at the best validation epoch
    settings: FmSettings
    best_epoch: int
    history: tuple[EpochStats, ...]
    accuracy: dict[str, float]            # split -> accuracy at the best epoch

    @property
    def mean_cosine(self) -> float:
        """Mean pairwise cosine between the feature embeddings (the paper's similarity diagnostic)."""
        return mean_pairwise_cosine(self.model.V.detach())


class _Rows:
    """One split's CSR arrays on the training device."""

    def __init__(self, data: FmData, device: torch.device) -> None:
        self.indptr = torch.from_numpy(data.indptr).to(device)
        self.indices = torch.from_numpy(data.indices).to(device)
        self.values = torch.from_numpy(data.values).to(device)
        self.label = torch.from_numpy(data.label.astype(np.float32)).to(device)
        self.n = data.n_rows

    def bags(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """embedding_bag input for `rows`: (indices [nnz_b], offsets [n_b], values [nnz_b])."""
        start = self.indptr[rows]
        length = self.indptr[rows + 1] - start                                      # [n_b]
        offsets = torch.cumsum(length, 0) - length
        total = int(length.sum())
        take = (torch.arange(total, device=rows.device)
                + torch.repeat_interleave(start - offsets, length, output_size=total))  # [nnz_b]
        return self.indices[take], offsets, self.values[take]


def fit(data: FmData, settings: FmSettings = FmSettings()) -> FmFit:
    """Train on the train split with Adam, keep the epoch with the best validation accuracy."""
    _check(data)
    device = settings.resolved_device()
    gen = torch.Generator().manual_seed(settings.seed)
    model = FactorizationMachine(data.n_features, settings.embedding, settings.init_std, gen).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    parts = {s: _Rows(data.rows(data.split == s), device) for s in SPLITS}
    history: list[EpochStats] = []
    best_key, best_state = None, None
    for epoch in range(1, settings.epochs + 1):
        train_loss = _train_epoch(model, opt, parts["train"], settings.batch_size, gen)
        val_loss, val_acc = evaluate(model, parts["val"])
        history.append(EpochStats(epoch, train_loss, val_loss, val_acc))
        key = (val_acc, -val_loss)                        # best accuracy; lower loss breaks ties
        if best_key is None or key > best_key:
            best_key, best_state = key, {k: v.detach().clone() for k, v in model.state_dict().items()}
            best_epoch = epoch
    model.load_state_dict(best_state)
    accuracy = {s: evaluate(model, parts[s])[1] for s in SPLITS}
    return FmFit(model.cpu().eval(), settings, best_epoch, tuple(history), accuracy)


def _train_epoch(model: FactorizationMachine, opt: torch.optim.Optimizer, rows: _Rows, batch_size: int,
                 gen: torch.Generator) -> float:
    model.train()
    order = torch.randperm(rows.n, generator=gen).to(rows.label.device)
    total = 0.0
    for start in range(0, rows.n, batch_size):
        batch = order[start:start + batch_size]
        logits = model(*rows.bags(batch))
        loss = F.binary_cross_entropy_with_logits(logits, rows.label[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(batch)
    return total / rows.n


@torch.no_grad()
def evaluate(model: FactorizationMachine, rows: _Rows, batch_size: int = 4096) -> tuple[float, float]:
    """(mean log loss, accuracy at logit 0) over all rows."""
    model.eval()
    logits = torch.cat([model(*rows.bags(torch.arange(s, min(s + batch_size, rows.n), device=rows.label.device)))
                        for s in range(0, rows.n, batch_size)])
    loss = F.binary_cross_entropy_with_logits(logits, rows.label).item()
    return loss, ((logits > 0).float() == rows.label).float().mean().item()


def predict(model: FactorizationMachine, data: FmData) -> torch.Tensor:
    """Logits of every row of `data`: [n_rows]."""
    rows = _Rows(data, next(model.parameters()).device)
    with torch.no_grad():
        return model(*rows.bags(torch.arange(rows.n, device=rows.label.device)))


def mean_pairwise_cosine(V: torch.Tensor) -> float:
    """Mean of cos(v_i, v_j) over pairs i != j in O(n k): (|sum u|^2 - n) / (n (n - 1)), u = v / |v|."""
    n = V.shape[0]
    if n < 2:
        return float("nan")
    u = F.normalize(V.double(), dim=-1)
    return float(((u.sum(0) ** 2).sum() - (u * u).sum()) / (n * (n - 1)))


def _check(data: FmData) -> None:
    for s in SPLITS:
        if not (data.split == s).any():
            raise UsageError(f"the FM data set has no {s} prompts; it needs train, val and test rows")
    if not np.isin(data.label, (0, 1)).all():
        raise UsageError("FM labels must be 0 (benign) or 1 (harmful); the data set has prompts labelled -1")
    if data.n_features == 0:
        raise UsageError("the FM data set has no features (no latent is active on a training prompt)")
