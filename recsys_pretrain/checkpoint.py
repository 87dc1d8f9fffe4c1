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

from recsys_pretrain.config import from_dict
from recsys_pretrain.io import atomic_dir
from recsys_pretrain.models import RecModel, model_class
from recsys_pretrain.vocab import Vocab


def build_model(name: str, cfg, n_users: int, n_items: int) -> RecModel:
    return model_class(name).build(cfg, n_users, n_items)


def save_model_dir(path: str | Path, name: str, cfg, model: RecModel, vocab: Vocab, item_emb: np.ndarray,
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


def load_model_dir(path: str | Path) -> tuple[RecModel, dict, Vocab]:
    """(model in eval mode, model.json contents, vocab)."""
    path = Path(path)
    if not (path / "model.json").exists():
        raise FileNotFoundError(f"{path}: not a model directory (no model.json)")
    meta = json.loads((path / "model.json").read_text())
    cfg = from_dict(model_class(meta["model"]).Config, meta["config"])
    model = build_model(meta["model"], cfg, meta["n_users"], meta["n_items"])
    model.load_state_dict(torch.load(path / "weights.pt", weights_only=True))
    model.eval()
    return model, meta, Vocab.load(path / "vocab.json")


# Warm start: parameters the model names as item rows (row = item index; row 0 padding, rows past the items
# special tokens) or user rows are carried over by raw id; every other parameter must have the same shape and
# is copied whole.


def item_overlap(source: str | Path, vocab: Vocab) -> float:
    """Share of `vocab`'s items that the model in `source` already has a row for."""
    old = Vocab.load(Path(source) / "vocab.json")
    return float((old.item_index(vocab.items, strict=False) > 0).mean()) if vocab.n_items else 0.0


def warm_start(model: RecModel, name: str, vocab: Vocab, source: str | Path) -> dict:
    """Initialise `model` (built for `vocab`) from the trained model directory `source`: rows of items and
    users both know are copied by raw id, new items and users keep their fresh initialisation, special-token
    rows after the items are copied in order, the rest of the network is copied. Refuses another model type
    or a different architecture."""
    src, meta, old = load_model_dir(source)
    if meta["model"] != name:
        raise ValueError(f"{source}: a {meta['model']} model cannot warm-start {name}")
    try:
        model.check_warm_start(meta["config"])
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    new_state, old_state = model.state_dict(), src.state_dict()
    item_new = old.item_index(vocab.items, strict=False)  # new item index i (1..n) -> old index or -1
    user_new = old.user_index(vocab.users, strict=False)
    carried_items = np.flatnonzero(item_new > 0) + 1  # new indices of items the source knows
    carried_users = np.flatnonzero(user_new >= 0)
    item_rows, user_rows = set(model.item_params), set(model.user_params)
    for key, new in new_state.items():  # check everything before writing anything
        prev = old_state.get(key)
        rows = key in item_rows or key in user_rows
        if prev is None or (prev.shape[1:] if rows else prev.shape) != (new.shape[1:] if rows else new.shape):
            raise ValueError(f"{source}: parameter {key} has shape {None if prev is None else tuple(prev.shape)}, "
                             f"this model {tuple(new.shape)}: the architecture changed, train from scratch")
        if key in item_rows and prev.shape[0] - old.n_items != new.shape[0] - vocab.n_items:
            raise ValueError(f"{source}: parameter {key} has {prev.shape[0] - old.n_items - 1} special rows, "
                             f"this model {new.shape[0] - vocab.n_items - 1}: train from scratch")
    with torch.no_grad():
        for key, new in new_state.items():
            prev = old_state[key]
            if key in item_rows:
                new[torch.from_numpy(carried_items)] = prev[torch.from_numpy(item_new[carried_items - 1])]
                new[vocab.n_items + 1 :] = prev[old.n_items + 1 :]  # special tokens ([MASK]) after the items
            elif key in user_rows:
                new[torch.from_numpy(carried_users)] = prev[torch.from_numpy(user_new[carried_users])]
            else:
                new.copy_(prev)
    model.load_state_dict(new_state)
    return {"source": str(source), "items_carried": len(carried_items), "items_new": vocab.n_items - len(carried_items),
            "users_carried": len(carried_users), "item_overlap": len(carried_items) / max(vocab.n_items, 1)}
