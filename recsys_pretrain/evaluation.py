"""Evaluation of a model on prepared data: leave-last-out over the whole catalogue, the user's history
excluded (metrics.py does the ranking). Model selection uses validation only; test is touched once per
reported model. Any registered model is scored the same way, through the contract: a user's query vector
dotted with every item vector.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from recsys_pretrain.data.prepared import PreparedData, history_matrix
from recsys_pretrain.metrics import evaluate_scores, popularity_scores
from recsys_pretrain.models import RecModel


def score_function(model: RecModel, data: PreparedData, stage: str) -> Callable[[np.ndarray], torch.Tensor]:
    """users (b,) -> (b, n_items) scores for predicting `stage`'s target."""
    hist = data.histories(stage)
    items = model.item_embeddings()  # (n_items, d')
    return lambda users: (model.user_embeddings(users, [hist[u] for u in users]) @ items.T).cpu()


def evaluate(model: RecModel, data: PreparedData, stage: str, batch_size: int = 512) -> dict[str, float]:
    targets = data.targets(stage)
    users = np.flatnonzero(targets >= 0)
    history = history_matrix(data.histories(stage), data.n_items)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = evaluate_scores(score_function(model, data, stage), users, targets[users], history, data.n_items,
                              batch_size=batch_size)
    model.train(was_training)
    return out


def evaluate_popularity(data: PreparedData, stage: str) -> dict[str, float]:
    pop = popularity_scores(data.train_matrix).float()
    targets = data.targets(stage)
    users = np.flatnonzero(targets >= 0)
    history = history_matrix(data.histories(stage), data.n_items)
    return evaluate_scores(lambda u: pop.expand(len(u), -1), users, targets[users], history, data.n_items)


def embeddings(model: RecModel, data: PreparedData, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(item vectors (n_items, d'), user vectors (n_users, d') from each user's full history)."""
    model.eval()
    full = data.full_sequences()
    with torch.no_grad():
        items = model.item_embeddings().cpu().numpy()
        parts = [model.user_embeddings(np.arange(i, min(i + batch_size, data.n_users)), full[i : i + batch_size])
                 .cpu().numpy() for i in range(0, data.n_users, batch_size)]
    users = np.concatenate(parts) if parts else np.zeros((0, items.shape[1]), np.float32)
    return items, users
