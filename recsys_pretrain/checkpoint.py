"""A trained model as a directory: what serving, evaluation, fine-tuning and MLflow load.

    model_dir/
      model.json             model name, its config, sizes, metrics
      weights.pt             state_dict (loaded with weights_only=True)
      vocab.json             raw id <-> index
      item_embeddings.npy    (n_items, d') row i-1 = item index i; dot products with user vectors = scores
      user_embeddings.npy    (n_users, d') from each user's full history
      histories.npz          (n_users, n_items + 1) CSR of the items each user has interacted with
      popularity.npy         (n_items,) interactions per item in training: the fallback ranking
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from recsys_pretrain.config import BERT4RecConfig, MFConfig, from_dict
from recsys_pretrain.io import atomic_dir
from recsys_pretrain.models import MODELS
from recsys_pretrain.vocab import Vocab

MODEL_CONFIGS = {"mf": MFConfig, "bert4rec": BERT4RecConfig}


def build_model(name: str, cfg: MFConfig | BERT4RecConfig, n_users: int, n_items: int) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    if name == "mf":
        return MODELS["mf"](n_users, n_items, cfg)
    return MODELS[name](n_items, cfg)


def save_model_dir(path: str | Path, name: str, cfg, model: nn.Module, vocab: Vocab, item_emb: np.ndarray,
                   user_emb: np.ndarray, histories: sp.csr_matrix, popularity: np.ndarray,
                   extra: dict | None = None) -> Path:
    with atomic_dir(path) as stage:
        meta = {"model": name, "config": dataclasses.asdict(cfg), "n_users": vocab.n_users,
                "n_items": vocab.n_items, **(extra or {})}
        (stage / "model.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        torch.save(model.state_dict(), stage / "weights.pt")
        vocab.save(stage / "vocab.json")
        np.save(stage / "item_embeddings.npy", item_emb.astype(np.float32))
        np.save(stage / "user_embeddings.npy", user_emb.astype(np.float32))
        sp.save_npz(stage / "histories.npz", histories.tocsr())
        np.save(stage / "popularity.npy", np.asarray(popularity, dtype=np.float32))
    return Path(path)


def load_model_dir(path: str | Path) -> tuple[nn.Module, dict, Vocab]:
    """(model in eval mode, model.json contents, vocab)."""
    path = Path(path)
    if not (path / "model.json").exists():
        raise FileNotFoundError(f"{path}: not a model directory (no model.json)")
    meta = json.loads((path / "model.json").read_text())
    cfg = from_dict(MODEL_CONFIGS[meta["model"]], meta["config"])
    model = build_model(meta["model"], cfg, meta["n_users"], meta["n_items"])
    model.load_state_dict(torch.load(path / "weights.pt", weights_only=True))
    model.eval()
    return model, meta, Vocab.load(path / "vocab.json")
