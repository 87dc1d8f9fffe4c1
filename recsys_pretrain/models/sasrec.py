"""SASRec: a causal Transformer over item sequences, trained to predict the next item at every position with a
softmax over the whole catalogue (the cross-entropy variant of "SASRec+" / "gSASRec" work, which trains far
better than the original one-negative binary loss).

Each position attends to itself and the items before it, so one sequence of length L gives L - 1 training
targets per pass (BERT4Rec's masking gives about a third of that). The output layer is tied to the item
embeddings plus a bias; a user's query vector is the output at the newest position of the history, and its
dot product with an item vector is the model's score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

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
class SASRecConfig:
    dim: int | None = None  # None = derived from the data (recipes.sequence_recipe), as for BERT4Rec
    n_layers: int = 2
    n_heads: int = 2
    ffn_mult: int = 4
    max_len: int | None = None  # positions the model reads (None = derived from the history lengths)
    dropout: float = 0.2  # embeddings, residual and feed-forward
    attn_dropout: float = 0.0  # > 0 forces PyTorch's slow attention kernel on CPU
    window: str = "last"  # training window of long histories: last | random (a random slice each epoch)
    negatives: int = 0  # 0 = full softmax; K > 0 = sampled softmax with K popularity-sampled negatives (logQ)
    init_std: float | None = 0.02  # truncated-normal std of embeddings and linear layers; None = PyTorch's own
    length_buckets: bool = True  # batch sequences of similar length together (less padding to compute)
    token_weighted: bool = True  # weigh each batch's loss by its targets, so each target counts alike
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=None, batch_size=None, lr=1e-3, weight_decay=0.01,
                                            warmup_steps=200, patience=6, eval_every=None)
    )


class NextItemTask(SequenceBatches):
    """Batches of training windows of max_len + 1 items: the first max_len are the input, the last max_len the
    targets (each position's next item); sequences of one item have no target and are left out."""

    def __init__(self, seqs: list[np.ndarray], cfg: SASRecConfig, n_items: int, batch_size: int):
        super().__init__(seqs, cfg.max_len + 1, batch_size, min_length=2, random_window=cfg.window == "random",
                         length_buckets=cfg.length_buckets, token_weighted=cfg.token_weighted)
        self.cfg, self.n_items = cfg, n_items
        self.q = popularity_sampler(self.seqs, n_items)

    def collate(self, windows: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        inputs, labels = windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)
        labels = labels.masked_fill(inputs == 0, 0)  # the first item is nobody's target
        batch = {"inputs": inputs, "labels": labels}
        if self.cfg.negatives:
            neg = torch.multinomial(self.q, self.cfg.negatives, replacement=True, generator=generator)
            batch["negatives"] = neg + 1
            batch["neg_logq"] = torch.log(self.q[neg]).float()
        return batch

    def expected_targets(self) -> float:
        return float((self.lengths - 1).sum())


class SASRec(RecModel):
    Config = SASRecConfig
    item_params = ("item.weight", "bias")  # rows: pad, items 1..n
    shape_keys = ("dim", "n_heads", "n_layers", "max_len", "ffn_mult")
    encode_method = "sasrec_history"
    SPACE: ClassVar[dict] = {
        "train.lr": {"type": "float", "low": 3e-4, "high": 1e-2, "log": True},
        "dim": {"type": "categorical", "choices": [64, 128, 256]},
        "max_len": {"type": "categorical", "choices": [50, 100, 200]},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5},
        "train.batch_size": {"type": "categorical", "choices": [16, 32, 64, 128, 256]},
    }

    def __init__(self, n_items: int, cfg: SASRecConfig):
        super().__init__()
        self.cfg, self.n_items = cfg, n_items
        init_encoder(self, n_items + 1, cfg)  # item rows: pad, items 1..n

    # ---- the contract ----------------------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: SASRecConfig, n_users: int, n_items: int) -> SASRec:
        return cls(n_items, cfg)

    @classmethod
    def recipe(cls, cfg: SASRecConfig, stats: dict) -> tuple[SASRecConfig, dict[str, str]]:
        return sequence_recipe(cfg, stats, extra_slot=False)

    @classmethod
    def search_space(cls, cfg: SASRecConfig) -> dict:
        return cls.SPACE

    @classmethod
    def task(cls, cfg: SASRecConfig, data: TrainingData) -> NextItemTask:
        return NextItemTask(data.train_seqs, cfg, data.n_items, cfg.train.batch_size)

    def item_embeddings(self) -> torch.Tensor:
        """(n_items, d + 1): tied output vectors with the bias as a last coordinate."""
        return torch.cat([self.item.weight[1:], self.bias[1:, None]], dim=1)

    def encode(self, histories: list[np.ndarray]) -> torch.Tensor:
        """(b, d + 1): the output at the newest of each history's last max_len items, with a constant 1 that
        meets the item bias."""
        width = max(1, min(self.cfg.max_len, max((len(h) for h in histories), default=0)))
        inputs = torch.from_numpy(pad_left(histories, width)).to(self.device())
        h = self.encode_inputs(inputs)[:, -1]  # (b, d)
        return torch.cat([h, torch.ones_like(h[:, :1])], dim=1)

    # ---- the network ------------------------------------------------------------------------------------------
    def encode_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, T) left-padded item indices (T <= max_len) -> (B, T, d): position t sees positions <= t."""
        T = inputs.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=inputs.device).tril()  # (T, T)
        mask = causal & (inputs != 0)[:, None, None, :]  # (B, 1, T, T): real earlier items only
        mask = mask | torch.eye(T, dtype=torch.bool, device=inputs.device)  # and itself (a padding row sees one key)
        return run_encoder(self, inputs, mask)

    def forward(
        self, inputs: torch.Tensor, labels: torch.Tensor | None = None, negatives: torch.Tensor | None = None,
        neg_logq: torch.Tensor | None = None, loss_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """inputs, labels (B, T); labels hold each position's next item and 0 where there is none.
        Returns (logits at the trained positions, loss): the mean over them, times `loss_scale` if given; a
        full softmax over the catalogue, or sampled softmax with `negatives` (tied_output_loss). Without
        labels: the logits at the last position."""
        h = self.encode_inputs(inputs)  # (B, T, d)
        if labels is None:
            return h[:, -1] @ self.item.weight[1:].T + self.bias[1:], None
        return tied_output_loss(self, h, labels, negatives, neg_logq, loss_scale)
