"""Matrix factorisation on implicit feedback.

Four solvers: `als` (implicit's weighted ALS, closed form per sweep; the default, its settings chosen on
validation from ALS_GRID), `svd` (PureSVD: the truncated SVD X ~ U S V^T of the user x item matrix, in closed
form; users are U S, items V), `softmax` (multinomial likelihood of a user's interactions over the whole
catalogue, as in Mult-VAE, by gradient descent; a batch is a set of users and their interaction rows) and
`bpr` (pairwise, one sampled negative per positive). benchmarks/results/suite.md compares them with the peers.

A fresh history (a user unknown to training) is folded in as the mean of its items' vectors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from implicit.cpu.als import AlternatingLeastSquares
from scipy.sparse.linalg import svds
from threadpoolctl import threadpool_limits
from torch import nn

from recsys_pretrain.models.base import RecModel, TrainingData
from recsys_pretrain.train_config import TrainConfig

# ALS: the settings left unset are chosen on validation from this grid (factors only when mf.dim is unset).
# implicit's ALS as a peer with this grid is the baseline mf is measured against (benchmarks/suite.py).
ALS_GRID = {"factors": (64, 128), "regularization": (0.01, 0.1, 1.0), "alpha": (1.0, 10.0)}
DEFAULT_DIM = 64  # the gradient-descent and svd solvers' dimension when mf.dim is unset
CLOSED_FORM = ("svd", "als")  # solvers that solve, not train by gradient descent
LOSSES = ("svd", "als", "softmax", "bpr")


@dataclass(frozen=True)
class MFConfig:
    dim: int | None = None  # None: chosen with the als grid, else DEFAULT_DIM
    # svd (PureSVD, closed form) | als (implicit's weighted ALS) | softmax (multinomial over the catalogue, by
    # AdamW) | bpr. `train` applies to softmax and bpr only.
    loss: str = "als"
    # als: L2 regularization and confidence scale; None = chosen on validation NDCG@10 from ALS_GRID
    regularization: float | None = None
    alpha: float | None = None
    iterations: int = 15
    init_std: float = 0.01
    # softmax and bpr (chosen on ML-1M validation: benchmarks/results/pretrain_ml1m.md)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=16, batch_size=128, lr=1e-2, weight_decay=0.0,
                                            warmup_steps=0, patience=2, eval_every=8)
    )


class SoftmaxTask:
    """Batches of users with their interaction rows as multinomial targets."""

    def __init__(self, matrix: sp.csr_matrix, batch_size: int):
        self.matrix = matrix[:, 1:].tocsr()  # drop the padding column: (n_users, n_items)
        self.users = np.flatnonzero(np.diff(self.matrix.indptr) > 0)
        self.batch_size = batch_size

    def n_batches(self) -> int:
        return -(-len(self.users) // self.batch_size)

    def batches(self, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        order = self.users[torch.randperm(len(self.users), generator=generator).numpy()]
        for i in range(0, len(order), self.batch_size):
            u = order[i : i + self.batch_size]
            yield {"users": torch.from_numpy(u), "targets": torch.from_numpy(self.matrix[u].toarray())}


class BPRTask:
    """Batches of (user, positive, uniformly sampled negative) triples."""

    def __init__(self, matrix: sp.csr_matrix, batch_size: int, n_items: int):
        coo = matrix.tocoo()
        self.users, self.items = coo.row.astype(np.int64), coo.col.astype(np.int64)
        self.batch_size, self.n_items = batch_size, n_items

    def n_batches(self) -> int:
        return -(-len(self.users) // self.batch_size)

    def batches(self, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.randperm(len(self.users), generator=generator)
        for i in range(0, len(order), self.batch_size):
            idx = order[i : i + self.batch_size].numpy()
            neg = torch.randint(1, self.n_items + 1, (len(idx),), generator=generator)
            yield {"users": torch.from_numpy(self.users[idx]), "pos": torch.from_numpy(self.items[idx]), "neg": neg}


class MF(RecModel):
    Config = MFConfig
    item_params = ("item.weight", "item_bias")
    user_params = ("user.weight",)
    shape_keys = ("dim", "loss")  # e.g. svd factors are not a starting point for the softmax loss
    encode_method = "mean_item_vector"
    SPACES: ClassVar[dict] = {
        "svd": {"dim": {"type": "categorical", "choices": [16, 32, 64, 128, 256, 512]}},
        "als": {"dim": {"type": "categorical", "choices": [32, 64, 128, 256]},
                "regularization": {"type": "float", "low": 1e-3, "high": 10.0, "log": True},
                "alpha": {"type": "float", "low": 0.1, "high": 40.0, "log": True}},
        "trained": {  # softmax and bpr: trained by AdamW
            "dim": {"type": "categorical", "choices": [32, 64, 128, 256]},
            "train.lr": {"type": "float", "low": 1e-3, "high": 5e-2, "log": True},
            "train.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-1, "log": True},
            "train.batch_size": {"type": "categorical", "choices": [64, 128, 256, 512]},
        },
    }

    def __init__(self, n_users: int, n_items: int, cfg: MFConfig):
        super().__init__()
        self.cfg, self.n_items = cfg, n_items
        self.user = nn.Embedding(n_users, cfg.dim)
        self.item = nn.Embedding(n_items + 1, cfg.dim, padding_idx=0)  # row = item index; 0 is padding
        self.item_bias = nn.Parameter(torch.zeros(n_items + 1))
        nn.init.normal_(self.user.weight, std=cfg.init_std)
        nn.init.normal_(self.item.weight, std=cfg.init_std)
        with torch.no_grad():
            self.item.weight[0].zero_()

    TIE_BREAK = 1e-6  # largest item bias of the svd solver: far below the factors' score differences

    @torch.no_grad()
    def fit_svd(self, matrix: sp.spmatrix, seed: int = 0) -> float:
        """Set the factors to the truncated SVD of `matrix` (n_users, n_items + 1; column 0 is padding):
        users U S, items V. A matrix of lower rank than `dim` (a tiny catalogue) fills the factors it has and
        leaves the rest zero. The item bias is popularity scaled to at most TIE_BREAK: it only orders what the
        factors tie on (a user without training events has a zero vector and gets the most popular items;
        items without training events rank by nothing else). Returns the relative squared residual
        1 - sum(s^2) / ||X||^2."""
        x = sp.csr_matrix(matrix, dtype=np.float64)[:, 1:]
        self.user.weight.zero_()
        self.item.weight.zero_()
        self.item_bias.zero_()
        total = x.multiply(x).sum()
        pop = np.asarray(x.sum(axis=0)).ravel()
        if pop.max(initial=0.0) > 0:
            self.item_bias[1:] = torch.from_numpy(self.TIE_BREAK * pop / pop.max())
        k = min(self.cfg.dim, min(x.shape) - 1)  # svds needs k < min(shape)
        if total == 0 or k < 1:
            return 0.0 if total == 0 else 1.0
        v0 = np.random.default_rng(seed).uniform(-1.0, 1.0, min(x.shape))  # ARPACK's start: seeded, deterministic
        u, s, vt = svds(x, k=k, v0=v0)
        order = np.argsort(-s)  # largest factor first
        self.user.weight[:, :k] = torch.from_numpy(np.ascontiguousarray(u[:, order] * s[order]))
        self.item.weight[1:, :k] = torch.from_numpy(np.ascontiguousarray(vt[order].T))
        return float(1.0 - (s**2).sum() / total)

    @torch.no_grad()
    def fit_als(self, matrix: sp.spmatrix, regularization: float, alpha: float, iterations: int,
                seed: int = 0) -> float:
        """Set the factors by implicit's weighted ALS (Hu, Koren and Volinsky 2008) on `matrix` (n_users,
        n_items + 1; column 0 is padding; values are confidences, scaled by `alpha`). Item bias: popularity
        scaled to TIE_BREAK, as for svd. Returns 0.0 (implicit reports no loss unless asked, at a cost)."""
        x = sp.csr_matrix(matrix, dtype=np.float32)[:, 1:].tocsr()
        self.user.weight.zero_()
        self.item.weight.zero_()
        self.item_bias.zero_()
        pop = np.asarray(x.sum(axis=0)).ravel()
        if pop.max(initial=0.0) > 0:
            self.item_bias[1:] = torch.from_numpy(self.TIE_BREAK * pop / pop.max())
        if x.nnz == 0:
            return 0.0
        als = AlternatingLeastSquares(factors=self.cfg.dim, regularization=regularization, alpha=alpha,
                                      iterations=iterations, random_state=seed)
        with threadpool_limits(1, "blas"):  # implicit's advice: its own threads, single-threaded BLAS
            als.fit(x, show_progress=False)
        self.user.weight.copy_(torch.from_numpy(np.asarray(als.user_factors)))
        self.item.weight[1:] = torch.from_numpy(np.asarray(als.item_factors))
        return 0.0

    def score_users(self, users: torch.Tensor) -> torch.Tensor:
        """(B,) user indices -> (B, n_items) scores over items 1..n."""
        return self.user(users) @ self.item.weight[1:].T + self.item_bias[1:]

    def forward(
        self,
        users: torch.Tensor,
        targets: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
        neg: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """softmax: targets (B, n_items) interaction weights -> (logits (B, n_items), loss).
        bpr: pos, neg (B,) item indices -> (score differences (B,), loss).
        (`svd` is not trained through forward: see `fit_svd`.)"""
        if pos is not None:
            u = self.user(users)  # (B, d)
            diff = (u * (self.item(pos) - self.item(neg))).sum(-1) + self.item_bias[pos] - self.item_bias[neg]
            return diff, -F.logsigmoid(diff).mean()
        logits = self.score_users(users)  # (B, n_items)
        if targets is None:
            return logits, None
        loss = -(targets * F.log_softmax(logits, dim=-1)).sum() / targets.sum().clamp_min(1.0)
        return logits, loss

    # ---- the contract ----------------------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: MFConfig, n_users: int, n_items: int) -> MF:
        if cfg.loss not in LOSSES:
            raise ValueError(f"unknown MF loss {cfg.loss!r}; use {', '.join(LOSSES)}")
        return cls(n_users, n_items, cfg)

    @classmethod
    def recipe(cls, cfg: MFConfig, stats: dict) -> tuple[MFConfig, dict[str, str]]:
        if cfg.dim is not None:
            return cfg, {}
        if cfg.loss == "als":
            dims = ALS_GRID["factors"]
            return dataclasses.replace(cfg, dim=max(dims)), {"dim": f"chosen on validation among {dims} (als grid)"}
        return dataclasses.replace(cfg, dim=DEFAULT_DIM), {"dim": f"{DEFAULT_DIM} ({cfg.loss})"}

    @classmethod
    def search_space(cls, cfg: MFConfig) -> dict:
        return cls.SPACES.get(cfg.loss, cls.SPACES["trained"])

    @classmethod
    def closed_form(cls, cfg: MFConfig) -> bool:
        return cfg.loss in CLOSED_FORM

    @classmethod
    def task(cls, cfg: MFConfig, data: TrainingData) -> SoftmaxTask | BPRTask:
        if cfg.loss == "softmax":
            return SoftmaxTask(data.train_matrix, cfg.train.batch_size)
        if cfg.loss == "bpr":
            return BPRTask(data.train_matrix, cfg.train.batch_size, data.n_items)
        return super().task(cfg, data)

    @classmethod
    def candidates(cls, cfg: MFConfig, free_dim: bool) -> list[tuple[MFConfig, dict]]:
        """svd: one; als: the grid (ALS_GRID) over the settings the config leaves unset (with `free_dim`,
        the factors too)."""
        if cfg.loss == "svd":
            return [(cfg, {})]
        grid = {k: (getattr(cfg, k),) if getattr(cfg, k) is not None else v for k, v in ALS_GRID.items()
                if k != "factors"}
        dims = ALS_GRID["factors"] if free_dim else (cfg.dim,)
        return [(dataclasses.replace(cfg, dim=f), {"factors": f, "regularization": r, "alpha": a})
                for f in dims for r in grid["regularization"] for a in grid["alpha"]]

    def solve(self, matrix: sp.csr_matrix, params: dict, seed: int) -> float:
        if self.cfg.loss == "svd":
            return self.fit_svd(matrix, seed=seed)
        return self.fit_als(matrix, regularization=params["regularization"], alpha=params["alpha"],
                            iterations=self.cfg.iterations, seed=seed)

    def item_embeddings(self) -> torch.Tensor:
        """(n_items, d + 1): item vectors with the bias as a last coordinate."""
        return torch.cat([self.item.weight[1:], self.item_bias[1:, None]], dim=1)

    def user_embeddings(self, users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
        """(b, d + 1): the training users' own rows, with a constant 1 that meets the item bias."""
        u = self.user(torch.as_tensor(users, dtype=torch.long, device=self.device()))
        return torch.cat([u, torch.ones_like(u[:, :1])], dim=1)

    def encode(self, histories: list[np.ndarray]) -> torch.Tensor:
        """(b, d + 1): a fresh history folded in as the mean of its items' vectors (a 1 in the last coordinate,
        as a trained user vector has); an empty history gets zeros and so the bias order (popularity)."""
        items = self.item_embeddings()
        q = torch.zeros(len(histories), items.shape[1], device=items.device)
        for r, h in enumerate(histories):
            if len(h):
                q[r] = items[torch.as_tensor(np.asarray(h) - 1, dtype=torch.long)].mean(0)
        q[:, -1] = 1.0
        return q
