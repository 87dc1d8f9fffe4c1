"""What the sequence models share: the Transformer block and the batching of training histories.

`SequenceBatches` cuts an epoch of user histories into batches (a window of each long history, batches of
similar length so that short histories cost little padding, each batch's loss weighted by its targets); a
model's task subclasses it and says how a batch of windows becomes its forward's inputs (`collate`).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys_pretrain.models.base import pad_left


class Block(nn.Module):
    """Pre-norm Transformer block; `mask` (bool, broadcastable to (B, h, T, T)) says which keys each query sees."""

    def __init__(self, d: int, n_heads: int, ffn_mult: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.n_heads, self.attn_dropout = n_heads, attn_dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_mult * d), nn.GELU(), nn.Linear(ffn_mult * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)  # 3 x (B, T, d)
        q, k, v = (t.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, h, T, dh)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0
        )  # (B, h, T, dh)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, d)))
        return x + self.drop(self.ffn(self.ln2(x)))


def init_weights(module: nn.Module, std: float) -> None:
    """Truncated-normal weights (at 2 std), zero biases, zero padding rows: `model.apply(partial(...))`."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()


def init_encoder(model: nn.Module, n_rows: int, cfg) -> None:
    """Give a sequence model its layers, under the names every sequence model's weights use: `item` (n_rows
    embeddings, row 0 padding), `pos` (max_len positions), `blocks`, `ln` and `bias` (the tied output's)."""
    if cfg.dim % cfg.n_heads:
        raise ValueError(f"dim {cfg.dim} is not divisible by n_heads {cfg.n_heads}")
    model.item = nn.Embedding(n_rows, cfg.dim, padding_idx=0)
    model.pos = nn.Embedding(cfg.max_len, cfg.dim)
    model.drop = nn.Dropout(cfg.dropout)
    model.blocks = nn.ModuleList(
        Block(cfg.dim, cfg.n_heads, cfg.ffn_mult, cfg.dropout, cfg.attn_dropout) for _ in range(cfg.n_layers)
    )
    model.ln = nn.LayerNorm(cfg.dim)
    model.bias = nn.Parameter(torch.zeros(n_rows))
    if cfg.init_std is not None:
        model.apply(partial(init_weights, std=cfg.init_std))


def run_encoder(model: nn.Module, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) left-padded item indices (T <= max_len) -> (B, T, d) through `init_encoder`'s layers, positions
    right-aligned (the last column is always the newest), attention limited by `mask`."""
    pos = model.pos.weight[model.cfg.max_len - inputs.shape[1] :]
    x = model.drop(model.item(inputs) + pos)  # (B, T, d)
    for block in model.blocks:
        x = block(x, mask)
    return model.ln(x)


def tied_output_loss(model: nn.Module, h: torch.Tensor, labels: torch.Tensor, negatives: torch.Tensor | None,
                     neg_logq: torch.Tensor | None, loss_scale: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """h (B, T, d), labels (B, T) with the target item where a position is trained and 0 elsewhere ->
    (logits at the trained positions, their mean cross-entropy times `loss_scale`). The output layer is the
    item table plus `bias` (items 1..n_items): a full softmax over the catalogue, or with `negatives` (K,)
    shared sampled items and their log sampling probabilities, sampled softmax with logQ correction."""
    n = model.n_items
    sel = labels != 0
    h, y = h[sel], labels[sel]  # (N, d), (N,)
    scale = 1.0 if loss_scale is None else loss_scale
    if negatives is None:
        logits = h @ model.item.weight[1 : n + 1].T + model.bias[1 : n + 1]  # (N, n_items)
        return logits, F.cross_entropy(logits, y - 1) * scale
    pos_logit = (h * model.item(y)).sum(-1) + model.bias[y]  # (N,)
    neg_logit = h @ model.item(negatives).T + model.bias[negatives] - neg_logq  # (N, K)
    neg_logit = neg_logit.masked_fill(negatives[None, :] == y[:, None], float("-inf"))  # no false negatives
    logits = torch.cat([pos_logit[:, None], neg_logit], dim=1)  # (N, 1 + K)
    return logits, F.cross_entropy(logits, torch.zeros_like(y)) * scale


class SequenceBatches:
    """Batches of training windows of user histories. Subclasses implement `collate` (a (B, T) left-padded
    tensor of windows -> the forward's kwargs, with `labels` holding the target item at each trained position
    and 0 elsewhere) and `expected_targets` (trained positions per epoch, for the token weighting)."""

    BUCKET_POOL = 64  # batches per length-sorted pool

    def __init__(self, seqs: list[np.ndarray], window: int, batch_size: int, *, min_length: int = 1,
                 random_window: bool = False, length_buckets: bool = True, token_weighted: bool = True):
        self.seqs = [s for s in seqs if len(s) >= min_length]
        self.window, self.batch_size = window, batch_size
        self.random_window, self.length_buckets, self.token_weighted = random_window, length_buckets, token_weighted
        self.lengths = np.fromiter((min(len(s), window) for s in self.seqs), dtype=np.int64, count=len(self.seqs))

    def n_batches(self) -> int:
        return -(-len(self.seqs) // self.batch_size)

    def collate(self, windows: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def expected_targets(self) -> float:
        raise NotImplementedError

    def _window(self, s: np.ndarray, generator: torch.Generator) -> np.ndarray:
        T = self.window
        if len(s) <= T or not self.random_window:
            return s[-T:]
        end = int(torch.randint(T, len(s) + 1, (1,), generator=generator))  # a random slice of a long history
        return s[end - T : end]

    def _order(self, generator: torch.Generator) -> list[np.ndarray]:
        """This epoch's batches of sequence indices. With `length_buckets`, a shuffled pool of up to
        BUCKET_POOL batches is sorted by length before it is cut, and the batches are shuffled again:
        each batch is padded only to its own longest sequence, so short histories cost little."""
        order = torch.randperm(len(self.seqs), generator=generator).numpy()
        bs = self.batch_size
        if not self.length_buckets:
            return [order[i : i + bs] for i in range(0, len(order), bs)]
        pool = bs * self.BUCKET_POOL
        out = []
        for p in range(0, len(order), pool):
            chunk = order[p : p + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]  # ties keep the random order
            out += [chunk[i : i + bs] for i in range(0, len(chunk), bs)]
        return [out[k] for k in torch.randperm(len(out), generator=generator).tolist()]

    def _batch(self, idx: np.ndarray, generator: torch.Generator) -> dict[str, torch.Tensor]:
        rows = [self._window(self.seqs[j], generator) for j in idx]
        return self.collate(torch.from_numpy(pad_left(rows, max(len(r) for r in rows))), generator)  # (B, T)

    def batches(self, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        batches = (self._batch(idx, generator) for idx in self._order(generator))
        if not self.token_weighted:
            yield from batches
            return
        # Every trained position of the epoch weighs alike, however the batches were cut: a batch's mean loss
        # is scaled by its targets over the expected targets per batch of the epoch.
        mean = self.expected_targets() / self.n_batches()
        for b in batches:
            yield {**b, "loss_scale": torch.tensor(float((b["labels"] != 0).sum()) / mean)}


def popularity_sampler(seqs: list[np.ndarray], n_items: int) -> torch.Tensor:
    """(n_items,) sampling probabilities of items 1..n for sampled softmax: (count + 1)^0.75, normalised."""
    counts = np.bincount(np.concatenate(seqs) if seqs else np.zeros(0, np.int64),
                         minlength=n_items + 1)[1:].astype(np.float64)
    q = (counts + 1.0) ** 0.75
    return torch.from_numpy(q / q.sum())
