"""A multi-task ranker over pretrained embeddings: pCTR and pCVR towers, pCTCVR = pCTR x pCVR (ESMM).

The user and item tables start from pretrained vectors (or at random, for the from-scratch baseline);
both towers read [user, item, user * item, features]. ESMM trains CTR on all rows and CTCVR on all rows,
so the CVR tower learns over the whole impression space without a selection bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ESMMRanker(nn.Module):
    def __init__(self, n_users: int, n_items: int, dim: int, n_features: int, hidden: int = 64):
        super().__init__()
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=0)
        nn.init.normal_(self.user.weight, std=0.05)
        nn.init.normal_(self.item.weight, std=0.05)
        self.norm = nn.LayerNorm(3 * dim + n_features)

        def tower() -> nn.Module:
            return nn.Sequential(nn.Linear(3 * dim + n_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

        self.ctr, self.cvr = tower(), tower()

    def load_pretrained(self, user_vecs: torch.Tensor, item_vecs: torch.Tensor) -> None:
        """user_vecs (n_users, dim); item_vecs (n_items, dim) for items 1..n."""
        with torch.no_grad():
            self.user.weight.copy_(user_vecs)
            self.item.weight[1:].copy_(item_vecs)

    def forward(self, users: torch.Tensor, items: torch.Tensor, feats: torch.Tensor,
                y_click: torch.Tensor | None = None, y_purchase: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (logits (B, 2): CTR and CVR, loss)."""
        u, v = self.user(users), self.item(items)  # (B, d)
        x = self.norm(torch.cat([u, v, u * v, feats], dim=1))  # (B, 3d + f)
        logits = torch.cat([self.ctr(x), self.cvr(x)], dim=1)  # (B, 2)
        if y_click is None:
            return logits, None
        p_ctcvr = torch.sigmoid(logits[:, 0]) * torch.sigmoid(logits[:, 1])
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], y_click.float()) + F.binary_cross_entropy(
            p_ctcvr.clamp(1e-7, 1 - 1e-7), y_purchase.float())
        return logits, loss

    @staticmethod
    def probabilities(logits: torch.Tensor) -> dict[str, torch.Tensor]:
        p_ctr, p_cvr = torch.sigmoid(logits[:, 0]), torch.sigmoid(logits[:, 1])
        return {"ctr": p_ctr, "cvr": p_cvr, "ctcvr": p_ctr * p_cvr}
