"""A prepared dataset as training and evaluation read it: the vocabulary, each user's training sequence, the
leave-last-out targets and the training matrix (written by `recsys-pretrain prepare`, data/prepare.py).

Leave-last-out: validation is each user's second-to-last item given the items before it, test the last item
given all the items before it. `histories(stage)` is what a model may see when it predicts `stage`'s target.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys_pretrain.vocab import Vocab


@dataclass
class PreparedData:
    name: str
    path: Path
    vocab: Vocab
    meta: dict
    train_seqs: list[np.ndarray]  # per user index: training items in order (empty if none)
    valid: np.ndarray  # (n_users,) validation target item, -1 if none
    test: np.ndarray  # (n_users,) test target item, -1 if none
    train_matrix: sp.csr_matrix  # (n_users, n_items + 1) event-weighted, training events only

    @property
    def n_users(self) -> int:
        return self.vocab.n_users

    @property
    def n_items(self) -> int:
        return self.vocab.n_items

    def histories(self, stage: str) -> list[np.ndarray]:
        """What the model may see when predicting `stage`'s target: train items (+ validation item for test)."""
        if stage == "valid":
            return self.train_seqs
        return [np.append(s, v) if v >= 0 else s for s, v in zip(self.train_seqs, self.valid, strict=True)]

    def targets(self, stage: str) -> np.ndarray:
        return self.valid if stage == "valid" else self.test

    def full_sequences(self) -> list[np.ndarray]:
        """Every interaction, for user vectors at serving time."""
        return [np.append(s, t) if t >= 0 else s for s, t in zip(self.histories("test"), self.test, strict=True)]

    def with_validation(self) -> PreparedData:
        """The same data with each user's validation item appended to its training sequence and added to the
        training matrix (weight 1): what a refit learns from once the model is chosen."""
        users = np.flatnonzero(self.valid >= 0)
        extra = sp.csr_matrix((np.ones(len(users), np.float32), (users, self.valid[users])),
                              shape=self.train_matrix.shape)
        return dataclasses.replace(self, train_seqs=self.histories("test"),
                                   train_matrix=(self.train_matrix + extra).tocsr())


def load_prepared(path: str | Path) -> PreparedData:
    path = Path(path)
    if not (path / "loo.parquet").exists():
        raise FileNotFoundError(f"{path}: no loo.parquet; run `recsys-pretrain prepare` first")
    vocab = Vocab.load(path / "vocab.json")
    meta = json.loads((path / "meta.json").read_text())
    loo = pl.read_parquet(path / "loo.parquet", columns=["user_idx", "train", "valid", "test"])
    seqs = [np.zeros(0, dtype=np.int64)] * vocab.n_users
    valid = np.full(vocab.n_users, -1, dtype=np.int64)
    test = np.full(vocab.n_users, -1, dtype=np.int64)
    users = loo["user_idx"].to_numpy()
    for u, items in zip(users, loo["train"].to_list(), strict=True):
        seqs[u] = np.asarray(items, dtype=np.int64)
    valid[users] = loo["valid"].fill_null(-1).to_numpy()
    test[users] = loo["test"].fill_null(-1).to_numpy()
    name = meta.get("dataset") or path.name
    return PreparedData(name=name, path=path, vocab=vocab, meta=meta, train_seqs=seqs, valid=valid, test=test,
                        train_matrix=sp.load_npz(path / "train_matrix.npz").tocsr())


def history_matrix(seqs: list[np.ndarray], n_items: int) -> sp.csr_matrix:
    """Binary (n_users, n_items + 1) matrix of the items in each sequence: what evaluation excludes."""
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    indptr = np.concatenate([[0], np.cumsum(lens)])
    cols = np.concatenate(seqs) if len(seqs) else np.zeros(0, dtype=np.int64)
    m = sp.csr_matrix((np.ones(len(cols), dtype=np.float32), cols, indptr), shape=(len(seqs), n_items + 1))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m
