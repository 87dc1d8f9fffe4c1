"""BERT4Rec: a bidirectional Transformer encoder over item sequences, trained by masked-item prediction.

The output layer is tied to the item embeddings (plus a bias), so a user's query vector (the encoder output
at a [MASK] appended after the history) and the item vectors live in one space, and their dot product is
the model's score. Attention uses PyTorch's fused kernel; attention dropout is off by default because on
CPU it forces the slow kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from recsys_pretrain.masking import append_mask, mask_items
from recsys_pretrain.models.base import RecModel, TrainingData, pad_left
from recsys_pretrain.models.sequential import (
    SequenceBatches,
    init_encoder,
    popularity_sampler,
    run_encoder,
    tied_output_loss,
)
from recsys_pretrain.recipes import sequence_recipe
from recsys_pretrain.train_config import TrainConfig


@dataclass(frozen=True)
class BERT4RecConfig:
    # None = derived from the data by recipes.sequence_recipe; the measurements behind the other defaults
    # are in benchmarks/results/pretrain_ml1m.md and bert4rec_early.md.
    dim: int | None = None
    n_layers: int = 2
    n_heads: int = 4
    ffn_mult: int = 4
    max_len: int | None = None
    dropout: float = 0.1  # embeddings, residual and feed-forward
    attn_dropout: float = 0.0  # > 0 forces PyTorch's slow attention kernel on CPU
    mask_prob: float = 0.3
    last_item_prob: float = 0.2  # share of training sequences with only the last item masked
    window: str = "last"  # training window of long histories: last | random (a random slice each epoch)
    negatives: int = 0  # 0 = full softmax; K > 0 = sampled softmax with K popularity-sampled negatives
    init_std: float | None = 0.02  # truncated-normal std of embeddings and linear layers; None = PyTorch's own
    length_buckets: bool = True  # batch sequences of similar length together (less padding to compute)
    token_weighted: bool = True  # weigh each batch's loss by its masked items, so each item counts alike
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=None, batch_size=None, lr=2e-3, weight_decay=0.01,
                                            warmup_steps=200, patience=6, eval_every=None)
    )


class MaskedItemTask(SequenceBatches):
    """Batches of masked training windows (masking happens here, in collate); with `negatives`, K shared
    popularity-sampled negatives per batch and their log sampling probabilities."""

    def __init__(self, seqs: list[np.ndarray], cfg: BERT4RecConfig, n_items: int, batch_size: int):
        super().__init__(seqs, cfg.max_len, batch_size, random_window=cfg.window == "random",
                         length_buckets=cfg.length_buckets, token_weighted=cfg.token_weighted)
        self.cfg, self.n_items = cfg, n_items
        self.q = popularity_sampler(self.seqs, n_items)

    def collate(self, windows: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        inputs, labels = mask_items(windows, self.cfg.mask_prob, self.n_items + 1, generator, self.cfg.last_item_prob)
        batch = {"inputs": inputs, "labels": labels}
        if self.cfg.negatives:
            neg = torch.multinomial(self.q, self.cfg.negatives, replacement=True, generator=generator)
            batch["negatives"] = neg + 1
            batch["neg_logq"] = torch.log(self.q[neg]).float()
        return batch

    def expected_targets(self) -> float:
        """Expected masked positions in an epoch under `mask_items`' rules: a sequence of L >= 2 items draws
        Binomial(L, p), bumped to 1 when none and cut to L - 1 when all; one item, or the last-item task, is 1."""
        L, p, last = self.lengths.astype(np.float64), self.cfg.mask_prob, self.cfg.last_item_prob
        drawn = np.where(L >= 2, L * p + (1 - p) ** L - p**L, 1.0)
        return float((last + (1 - last) * drawn).sum())


class BERT4Rec(RecModel):
    Config = BERT4RecConfig
    item_params = ("item.weight", "bias")  # rows: pad, items 1..n, [MASK]
    shape_keys = ("dim", "n_heads", "n_layers", "max_len", "ffn_mult")
    encode_method = "bert4rec_history"
    SPACE: ClassVar[dict] = {
        "train.lr": {"type": "float", "low": 3e-4, "high": 1e-2, "log": True},
        "dim": {"type": "categorical", "choices": [64, 128, 256]},
        "max_len": {"type": "categorical", "choices": [50, 100, 200]},
        "mask_prob": {"type": "float", "low": 0.1, "high": 0.5},
        "dropout": {"type": "float", "low": 0.0, "high": 0.3},
        "train.batch_size": {"type": "categorical", "choices": [16, 32, 64, 128]},
    }

    def __init__(self, n_items: int, cfg: BERT4RecConfig):
        super().__init__()
        self.cfg, self.n_items = cfg, n_items
        self.mask_token = n_items + 1
        init_encoder(self, n_items + 2, cfg)  # item rows: pad, items 1..n, [MASK]

    # ---- the contract ----------------------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: BERT4RecConfig, n_users: int, n_items: int) -> BERT4Rec:
        return cls(n_items, cfg)

    @classmethod
    def recipe(cls, cfg: BERT4RecConfig, stats: dict) -> tuple[BERT4RecConfig, dict[str, str]]:
        return sequence_recipe(cfg, stats, extra_slot=True)

    @classmethod
    def search_space(cls, cfg: BERT4RecConfig) -> dict:
        return cls.SPACE

    @classmethod
    def task(cls, cfg: BERT4RecConfig, data: TrainingData) -> MaskedItemTask:
        return MaskedItemTask(data.train_seqs, cfg, data.n_items, cfg.train.batch_size)

    def item_embeddings(self) -> torch.Tensor:
        """(n_items, d + 1): tied output vectors with the bias as a last coordinate."""
        items = slice(1, self.n_items + 1)
        return torch.cat([self.item.weight[items], self.bias[items, None]], dim=1)

    def encode(self, histories: list[np.ndarray]) -> torch.Tensor:
        """(b, d + 1): the encoder output at a [MASK] after the newest max_len - 1 items of each history, with a
        constant 1 that meets the item bias."""
        h = self.encode_inputs(self.query_inputs(histories).to(self.device()))[:, -1]  # (b, d)
        return torch.cat([h, torch.ones_like(h[:, :1])], dim=1)

    def query_inputs(self, histories: list[np.ndarray]) -> torch.Tensor:
        """(b, T) inputs: the newest T - 1 items of each history, then [MASK]; T = max_len, or less when every
        history is shorter (the columns left out would be padding only, which attention ignores)."""
        width = min(self.cfg.max_len, max((len(h) for h in histories), default=0) + 1)
        return append_mask(torch.from_numpy(pad_left(histories, width)), self.mask_token)

    # ---- the network ------------------------------------------------------------------------------------------
    def encode_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, T) left-padded item indices (T <= max_len) -> (B, T, d): every position sees every real item."""
        return run_encoder(self, inputs, (inputs != 0)[:, None, None, :])  # mask (B, 1, 1, T)

    def forward(
        self, inputs: torch.Tensor, labels: torch.Tensor | None = None, negatives: torch.Tensor | None = None,
        neg_logq: torch.Tensor | None = None, loss_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """inputs, labels (B, T); labels hold the item at masked positions and 0 elsewhere.
        Returns (logits at the masked positions, loss): the mean over masked positions, times `loss_scale`
        if given; a full softmax over the catalogue, or sampled softmax with `negatives` (tied_output_loss).
        Without labels: the logits at the last position."""
        h = self.encode_inputs(inputs)  # (B, T, d)
        if labels is None:
            n = self.n_items
            return h[:, -1] @ self.item.weight[1 : n + 1].T + self.bias[1 : n + 1], None
        return tied_output_loss(self, h, labels, negatives, neg_logq, loss_scale)
