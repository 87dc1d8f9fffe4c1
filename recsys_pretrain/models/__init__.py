"""The model registry: the one place that lists models. Every caller goes through it and the contract in
models/base.py; a new model is one file (its config, network and task) plus one line here."""

from __future__ import annotations

from typing import Any

import numpy as np

from recsys_pretrain.models.base import RecModel
from recsys_pretrain.models.bert4rec import BERT4Rec
from recsys_pretrain.models.mf import MF
from recsys_pretrain.models.sasrec import SASRec
from recsys_pretrain.recipes import history_stats

MODELS: dict[str, type[RecModel]] = {
    "mf": MF,
    "bert4rec": BERT4Rec,
    "sasrec": SASRec,
}


def model_class(name: str) -> type[RecModel]:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name]


def model_name(model: RecModel) -> str:
    """The registry name of a model instance."""
    return next(name for name, cls in MODELS.items() if type(model) is cls)


def resolve(name: str, cfg: Any, train_seqs: list[np.ndarray]) -> tuple[Any, dict[str, str]]:
    """Model `name`'s config with every data-derived default filled in from the training sequences, and the
    rules that filled them (explicit settings win)."""
    return model_class(name).recipe(cfg, history_stats(train_seqs))


__all__ = ["MODELS", "RecModel", "model_class", "model_name", "resolve"]
