"""Matrix factorisation on implicit feedback.

Three solvers: `svd` (PureSVD: the truncated SVD X ~ U S V^T of the user x item matrix, in closed form;
users are U S, items V), `softmax` (multinomial likelihood of a user's interactions over the whole
catalogue, as in Mult-VAE, by gradient descent; a batch is a set of users and their interaction rows) and
`bpr` (pairwise, one sampled negative per positive). On ML-1M (benchmarks/pretrain_ml1m.py) `svd` measured
best on validation and fits in about a second, so it is the default.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import svds
from torch import nn

from recsys_pretrain.config import MFConfig


class MF(nn.Module):
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
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

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

    # ---- the contract shared with BERT4Rec: dot products of these are the model's own scores -------------
    def item_embeddings(self) -> torch.Tensor:
        """(n_items, d + 1): item vectors with the bias as a last coordinate."""
        return torch.cat([self.item.weight[1:], self.item_bias[1:, None]], dim=1)

    def user_embeddings(self, users: torch.Tensor) -> torch.Tensor:
        """(B,) user indices -> (B, d + 1), with a constant 1 that meets the item bias."""
        u = self.user(users)
        return torch.cat([u, torch.ones_like(u[:, :1])], dim=1)
