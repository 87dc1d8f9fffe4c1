"""The model contract: what every model answers, so that no caller asks a model what it is.

A model is one file holding its config class, its `nn.Module` (a subclass of `RecModel`) and, for a model
trained by gradient descent, its training task (where its batches come from). The registry dict in
`models/__init__.py` is the only place that lists models; pretraining, evaluation, checkpoints, warm start,
recommendation, the nightly flow, the CLI and the config all go through it and this contract.

Scores are dot products: `user_embeddings(...) @ item_embeddings().T` is the model's own score of every item,
so evaluation, the FAISS index and serving treat every model alike. The methods that take histories receive
them as NumPy arrays of item indices (1..n_items, oldest first) and turn them into tensors themselves
(`pad_left`); `forward` sees tensors only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Protocol

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn


class TrainingData(Protocol):
    """What a model's task reads: prepared data (recsys_pretrain.data.prepared.PreparedData) satisfies it."""

    n_users: int
    n_items: int
    train_seqs: list[np.ndarray]  # per user index: training items in order (empty if none)
    train_matrix: sp.csr_matrix  # (n_users, n_items + 1) event-weighted; column 0 is padding


class Task(Protocol):
    """Batches for the training loop (recsys_pretrain/train/loop.py): each batch is the model's forward kwargs."""

    def n_batches(self) -> int: ...

    def batches(self, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]: ...


class RecModel(nn.Module):
    """Base class of every model. Subclasses set the class attributes and implement the abstract methods;
    the defaults below fit a model trained by gradient descent that encodes histories."""

    Config: ClassVar[type]  # the model's config dataclass (with a `train: TrainConfig` section)
    # Parameters with one row per item index (row 0 = padding, rows past n_items = special tokens such as
    # [MASK]) or per user index: warm start carries these rows over by raw id and copies the rest whole.
    item_params: ClassVar[tuple[str, ...]] = ()
    user_params: ClassVar[tuple[str, ...]] = ()
    # Config keys that size or shape the weights: a warm start needs them equal.
    shape_keys: ClassVar[tuple[str, ...]] = ("dim",)
    # How a fresh history becomes a query vector (what an answer reports as its method).
    encode_method: ClassVar[str] = "history"

    # ---- construction and defaults -------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: Any, n_users: int, n_items: int) -> RecModel:
        """The model for a vocabulary of `n_users` users and `n_items` items, from a resolved config."""
        raise NotImplementedError

    @classmethod
    def recipe(cls, cfg: Any, stats: dict) -> tuple[Any, dict[str, str]]:
        """`cfg` with the settings it leaves unset (None) derived from the training data's statistics
        (recsys_pretrain.recipes.history_stats), and per derived key the rule that set it."""
        return cfg, {}

    @classmethod
    def search_space(cls, cfg: Any) -> dict[str, dict[str, Any]]:
        """The default search space of `recsys-pretrain tune` (Optuna distributions by dotted key under this
        model's config section, e.g. "train.lr")."""
        return {}

    # ---- training --------------------------------------------------------------------------------------------
    @classmethod
    def closed_form(cls, cfg: Any) -> bool:
        """True when the model is solved (`candidates` + `solve`), not trained in batches (`task`)."""
        return False

    @classmethod
    def task(cls, cfg: Any, data: TrainingData) -> Task:
        """The training batches (a model trained by gradient descent)."""
        raise NotImplementedError(f"{cls.__name__} is solved in closed form: it has no training task")

    @classmethod
    def candidates(cls, cfg: Any, free_dim: bool) -> list[tuple[Any, dict]]:
        """Closed form: the (config, solver settings) pairs to solve and compare on validation, in order.
        `free_dim`: the dimension was not set explicitly and may be chosen too."""
        raise NotImplementedError(f"{cls.__name__} is trained, not solved in closed form")

    def solve(self, matrix: sp.csr_matrix, params: dict, seed: int) -> float:
        """Closed form: set the weights from the (n_users, n_items + 1) training matrix; return a loss."""
        raise NotImplementedError(f"{type(self).__name__} is trained, not solved in closed form")

    # ---- vectors: dot products of these are the model's scores ------------------------------------------
    def item_embeddings(self) -> torch.Tensor:
        """(n_items, d') item vectors; row i - 1 is item index i."""
        raise NotImplementedError

    def user_embeddings(self, users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
        """(b, d') query vectors of training users (`users`: their indices) given `histories` (what each may
        see). A model with a row per user reads its rows; a sequence model encodes the histories."""
        return self.encode(histories)

    def encode(self, histories: list[np.ndarray]) -> torch.Tensor:
        """(b, d') query vectors of fresh histories (users unknown to training, or a live session)."""
        raise NotImplementedError

    # ---- warm start ------------------------------------------------------------------------------------------
    def check_warm_start(self, source_config: dict) -> None:
        """Raise ValueError when a trained model of this type with `source_config` cannot start this one."""
        for key in self.shape_keys:
            then, now = source_config.get(key), getattr(self.cfg, key, None)
            if then != now:
                raise ValueError(f"the architecture changed ({key} {then!r}, this model {now!r}): train from scratch")

    def device(self) -> torch.device:
        return next(self.parameters()).device


def pad_left(seqs: list[np.ndarray], length: int) -> np.ndarray:
    """(n, length) int64: each sequence's last `length` items, right-aligned, zeros in front."""
    out = np.zeros((len(seqs), length), dtype=np.int64)
    for r, s in enumerate(seqs):
        s = s[-length:] if length else s[:0]
        if len(s):
            out[r, length - len(s):] = s
    return out
