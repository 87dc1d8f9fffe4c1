"""The fine-tuned ranker at inference: load a ranker directory, score (user, item) pairs.

A ranker directory (written by `recsys_pretrain.train.finetune.save_ranker`) holds `weights.pt`,
`ranker.json` (dims, hidden sizes, features), `vocab.json` and `features.npz`. Serving and the pyfunc
wrapper read it through this module, which knows nothing of training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import torch

from recsys_pretrain import schema as S
from recsys_pretrain.data.labels import features
from recsys_pretrain.models.heads import ESMMRanker
from recsys_pretrain.vocab import Vocab

__all__ = ["RANKER_META", "load_ranker", "predict_pairs", "score_pairs"]

RANKER_META = "ranker.json"  # the file that marks a ranker directory


def load_ranker(path: str | Path) -> tuple[ESMMRanker, dict, Vocab]:
    """(ranker in eval mode, feature tables, vocab) from a ranker directory."""
    path = Path(path)
    meta = json.loads((path / RANKER_META).read_text())
    vocab = Vocab.load(path / "vocab.json")
    model = ESMMRanker(vocab.n_users, vocab.n_items, meta["dim"], meta["n_features"], meta["hidden"])
    model.load_state_dict(torch.load(path / "weights.pt", weights_only=True))
    model.eval()
    return model, dict(np.load(path / "features.npz")), vocab


def predict_pairs(model: ESMMRanker, users: np.ndarray, items: np.ndarray, feats: np.ndarray,
                  batch_size: int = 8192) -> dict[str, np.ndarray]:
    """pCTR, pCVR, pCTCVR for (user index, item index) pairs with their feature rows, in batches."""
    model.eval()
    out: dict[str, list] = {"ctr": [], "cvr": [], "ctcvr": []}
    with torch.no_grad():
        for i in range(0, len(users), batch_size):
            s = slice(i, i + batch_size)
            logits, _ = model(torch.from_numpy(users[s]), torch.from_numpy(items[s]), torch.from_numpy(feats[s]))
            for k, v in ESMMRanker.probabilities(logits).items():
                out[k].append(v.numpy())
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def score_pairs(model: ESMMRanker, feats: dict, users: np.ndarray, items: np.ndarray) -> dict[str, np.ndarray]:
    """pCTR, pCVR, pCTCVR for (user index, item index) pairs."""
    df = pl.DataFrame({S.USER_IDX: users.astype(np.uint32), S.ITEM_IDX: items.astype(np.uint32)})
    return predict_pairs(model, users.astype(np.int64), items.astype(np.int64), features(df, feats))
