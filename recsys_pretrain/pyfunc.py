"""The models this project logs to MLflow as pyfuncs: what `mlflow.pyfunc.load_model` gives back.

    EmbeddingScorer   a model directory: (user_id, item_id) raw-id pairs -> the model's own score
    RankerScorer      a fine-tuned ranker directory: pairs -> p_ctr, p_cvr, p_ctcvr (what re-ranks candidates)
    log_recommender(tracker, model_dir) / log_ranker(tracker, ranker_dir)
                      log one through any Tracker's `log_pyfunc_model`; the `models:/` uri is returned

MLflow pickles the wrapper instances by reference: a logged model loads wherever this module imports.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from recsys_pretrain.ranker import RANKER_META, load_ranker, score_pairs
from recsys_pretrain.tracking import Tracker
from recsys_pretrain.vocab import Vocab

__all__ = ["EmbeddingScorer", "RankerScorer", "log_ranker", "log_recommender", "scorer_input_example"]


class EmbeddingScorer(mlflow.pyfunc.PythonModel):
    """Scores `(user_id, item_id)` pairs given in raw ids with a model directory's embeddings.

    The dot product of a user's and an item's vector is the model's own score (see the models'
    `item_embeddings` / `user_embeddings` contract), so this is exactly what the trained model ranks by.
    Unknown ids score NaN.
    """

    def load_context(self, context) -> None:
        path = Path(context.artifacts["model_dir"])
        self.users = np.load(path / "user_embeddings.npy")
        self.items = np.load(path / "item_embeddings.npy")
        self.vocab = Vocab.load(path / "vocab.json")

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        u = self.vocab.user_index(list(model_input["user_id"]), strict=False)
        i = self.vocab.item_index(list(model_input["item_id"]), strict=False)
        known = (u >= 0) & (i >= 1)
        scores = np.full(len(model_input), np.nan, dtype=np.float64)
        scores[known] = np.einsum("nd,nd->n", self.users[u[known]], self.items[i[known] - 1])
        return scores


class RankerScorer(mlflow.pyfunc.PythonModel):
    """The fine-tuned ranker: `(user_id, item_id)` raw-id pairs -> columns p_ctr, p_cvr, p_ctcvr.
    Unknown ids score NaN. This is what re-ranks candidates from the index."""

    def load_context(self, context) -> None:
        self.model, self.feats, self.vocab = load_ranker(context.artifacts["ranker_dir"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        u = self.vocab.user_index(list(model_input["user_id"]), strict=False)
        i = self.vocab.item_index(list(model_input["item_id"]), strict=False)
        known = (u >= 0) & (i >= 1)
        out = {k: np.full(len(model_input), np.nan) for k in ("p_ctr", "p_cvr", "p_ctcvr")}
        if known.any():
            p = score_pairs(self.model, self.feats, u[known], i[known])
            for k in ("ctr", "cvr", "ctcvr"):
                out[f"p_{k}"][known] = p[k]
        return pd.DataFrame(out)


def scorer_input_example(model_dir: str | Path, n: int = 3) -> pd.DataFrame:
    """A few (user_id, item_id) raw-id pairs from the model's vocab, for the signature."""
    vocab = Vocab.load(Path(model_dir) / "vocab.json")
    users = vocab.users.drop_nulls()  # (a forgotten user's slot is null)
    k = min(n, len(users), vocab.n_items)
    return pd.DataFrame({"user_id": users.head(k).to_list(), "item_id": vocab.items.head(k).to_list()})


def log_recommender(tracker: Tracker, model_dir: str | Path, name: str = "model",
                    registered_model_name: str | None = None) -> str | None:
    """Log a model directory as a pyfunc `EmbeddingScorer` in the tracker's active run; returns its
    `models:/` uri (whatever the tracker's `log_pyfunc_model` returns)."""
    if not (Path(model_dir) / "item_embeddings.npy").exists():
        raise FileNotFoundError(f"{model_dir}: not a model directory")
    return tracker.log_pyfunc_model(EmbeddingScorer(), name, {"model_dir": str(model_dir)},
                                    scorer_input_example(model_dir), registered_model_name)


def log_ranker(tracker: Tracker, ranker_dir: str | Path, name: str = "ranker",
               registered_model_name: str | None = None) -> str | None:
    """Log a fine-tuned ranker directory as a pyfunc `RankerScorer` in the tracker's active run; returns its
    `models:/` uri (whatever the tracker's `log_pyfunc_model` returns)."""
    if not (Path(ranker_dir) / RANKER_META).exists():
        raise FileNotFoundError(f"{ranker_dir}: not a ranker directory")
    return tracker.log_pyfunc_model(RankerScorer(), name, {"ranker_dir": str(ranker_dir)},
                                    scorer_input_example(ranker_dir), registered_model_name)
