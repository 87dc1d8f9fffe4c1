"""BERT4Rec: a bidirectional Transformer encoder over item sequences, trained by masked-item prediction.

The output layer is tied to the item embeddings (plus a bias), so a user's query vector (the encoder output
at a [MASK] appended after the history) and the item vectors live in one space, and their dot product is
the model's score. Attention uses PyTorch's fused kernel; attention dropout is off by default because on
CPU it forces the slow kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recsys_pretrain.config import BERT4RecConfig


class Block(nn.Module):
    """Pre-norm Transformer encoder block."""

    def __init__(self, d: int, n_heads: int, ffn_mult: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.n_heads, self.attn_dropout = n_heads, attn_dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_mult * d), nn.GELU(), nn.Linear(ffn_mult * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)  # 3 x (B, T, d)
        q, k, v = (t.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, h, T, dh)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask, dropout_p=self.attn_dropout if self.training else 0.0
        )  # (B, h, T, dh)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, d)))
        return x + self.drop(self.ffn(self.ln2(x)))


class BERT4Rec(nn.Module):
    def __init__(self, n_items: int, cfg: BERT4RecConfig):
        super().__init__()
        if cfg.dim % cfg.n_heads:
            raise ValueError(f"dim {cfg.dim} is not divisible by n_heads {cfg.n_heads}")
        self.cfg, self.n_items = cfg, n_items
        self.mask_token = n_items + 1
        self.item = nn.Embedding(n_items + 2, cfg.dim, padding_idx=0)  # pad, items 1..n, mask
        self.pos = nn.Embedding(cfg.max_len, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.n_heads, cfg.ffn_mult, cfg.dropout, cfg.attn_dropout) for _ in range(cfg.n_layers)
        )
        self.ln = nn.LayerNorm(cfg.dim)
        self.bias = nn.Parameter(torch.zeros(n_items + 2))
        if cfg.init_std is not None:
            self.apply(self._init)

    def _init(self, m: nn.Module) -> None:
        std = self.cfg.init_std
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, T) left-padded item indices (T <= max_len) -> (B, T, d) contextual vectors."""
        T = inputs.shape[1]
        key_mask = (inputs != 0)[:, None, None, :]  # (B, 1, 1, T): attend to real positions only
        pos = self.pos.weight[self.cfg.max_len - T :]  # right-aligned: the last column is always the newest
        x = self.drop(self.item(inputs) + pos)  # (B, T, d)
        for block in self.blocks:
            x = block(x, key_mask)
        return self.ln(x)

    def forward(
        self, inputs: torch.Tensor, labels: torch.Tensor | None = None, negatives: torch.Tensor | None = None,
        neg_logq: torch.Tensor | None = None, loss_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """inputs, labels (B, T); labels hold the item at masked positions and 0 elsewhere.
        Returns (logits at the masked positions, loss): the mean over masked positions, times `loss_scale`
        if given. Full softmax over the catalogue by default; with `negatives` (K,) shared sampled items and
        their log sampling probabilities, sampled softmax with logQ correction."""
        h = self.encode(inputs)  # (B, T, d)
        if labels is None:
            return self._logits(h[:, -1]), None
        sel = labels != 0
        h, y = h[sel], labels[sel]  # (N, d), (N,)
        scale = 1.0 if loss_scale is None else loss_scale
        if negatives is None:
            logits = self._logits(h)  # (N, n_items) over items 1..n
            return logits, F.cross_entropy(logits, y - 1) * scale
        # Sampled softmax: the true item against K shared negatives, each logit corrected by -log q.
        pos_logit = (h * self.item(y)).sum(-1) + self.bias[y]  # (N,)
        neg_logit = h @ self.item(negatives).T + self.bias[negatives] - neg_logq  # (N, K)
        neg_logit = neg_logit.masked_fill(negatives[None, :] == y[:, None], float("-inf"))  # no false negatives
        logits = torch.cat([pos_logit[:, None], neg_logit], dim=1)  # (N, 1 + K)
        return logits, F.cross_entropy(logits, torch.zeros_like(y)) * scale

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.item.weight[1 : self.n_items + 1].T + self.bias[1 : self.n_items + 1]

    # ---- the contract shared with MF: dot products of these are the model's own scores -----------------
    def item_embeddings(self) -> torch.Tensor:
        """(n_items, d + 1): tied output vectors with the bias as a last coordinate."""
        items = slice(1, self.n_items + 1)
        return torch.cat([self.item.weight[items], self.bias[items, None]], dim=1)

    def user_embeddings(self, history: torch.Tensor) -> torch.Tensor:
        """(B, T) left-padded histories with [MASK] already in the last column -> (B, d + 1)."""
        h = self.encode(history)[:, -1]  # (B, d)
        return torch.cat([h, torch.ones_like(h[:, :1])], dim=1)
