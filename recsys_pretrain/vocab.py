"""Raw id <-> dense index for users and items. The padding and mask indices are owned here alone.

Items: PAD = 0, real items 1..n_items, MASK = n_items + 1 (so an embedding table has n_items + 2 rows).
Users: 0..n_users - 1. Raw ids keep the type they were given (int or str) and are stored sorted, except
in an append-only vocabulary (`Vocab.extend`, the partitioned nightly ingest): there every id keeps the
index it was first given, and ids new on a night are appended (sorted among themselves) after the old ones;
a user forgotten from it leaves a null in its slot (no id, and no other user moves).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recsys_pretrain.io import write_json

PAD = 0


@dataclass(frozen=True)
class Vocab:
    users: pl.Series  # raw user ids, sorted (or append-only: see `extend`); position = user index
    items: pl.Series  # raw item ids, sorted (or append-only: see `extend`); position + 1 = item index

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def pad(self) -> int:
        return PAD

    @property
    def mask(self) -> int:
        return self.n_items + 1

    @property
    def n_item_tokens(self) -> int:
        """Rows an item embedding table needs: padding, the items, the mask."""
        return self.n_items + 2

    @classmethod
    def from_ids(cls, users: pl.Series, items: pl.Series) -> Vocab:
        return cls(users=users.unique().sort().rename("user_id"), items=items.unique().sort().rename("item_id"))

    def extend(self, users: pl.Series, items: pl.Series) -> Vocab:
        """This vocabulary with the ids of `users` and `items` it does not know appended (sorted among
        themselves): every known id keeps its index, so indices stay valid across nights."""
        new_users = users.unique().filter(~users.unique().is_in(self.users.implode())).sort()
        new_items = items.unique().filter(~items.unique().is_in(self.items.implode())).sort()
        return Vocab(users=pl.concat([self.users, new_users.cast(self.users.dtype)]).rename("user_id"),
                     items=pl.concat([self.items, new_items.cast(self.items.dtype)]).rename("item_id"))

    @classmethod
    def empty(cls, id_type: str = "str") -> Vocab:
        dtype = pl.Int64 if id_type == "int" else pl.String
        return cls(users=pl.Series("user_id", [], dtype=dtype), items=pl.Series("item_id", [], dtype=dtype))

    # ---- lookups: vectorised binary search over the sorted ids -------------------------------------
    def user_index(self, raw: pl.Series | list, strict: bool = True) -> np.ndarray:
        return _lookup(self.users, raw, offset=0, strict=strict, kind="user")

    def item_index(self, raw: pl.Series | list, strict: bool = True) -> np.ndarray:
        return _lookup(self.items, raw, offset=1, strict=strict, kind="item")

    def user_ids(self, index: np.ndarray) -> list:
        return self.users.gather(np.asarray(index, dtype=np.int64)).to_list()

    def item_ids(self, index: np.ndarray) -> list:
        idx = np.asarray(index, dtype=np.int64)
        if ((idx < 1) | (idx > self.n_items)).any():
            raise ValueError("item index out of range (0 is padding, n_items + 1 is the mask)")
        return self.items.gather(idx - 1).to_list()

    # ---- persistence --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        return write_json(
            path,
            {
                "id_dtype": {"user": str(self.users.dtype), "item": str(self.items.dtype)},
                "pad": PAD,
                "mask": self.mask,
                "n_users": self.n_users,
                "n_items": self.n_items,
                "users": self.users.to_list(),
                "items": self.items.to_list(),
            },
        )

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        path = Path(path)
        if path.is_dir():
            path = path / "vocab.json"
        data = json.loads(path.read_text())
        dt = {"Int64": pl.Int64, "String": pl.String}
        users = pl.Series("user_id", data["users"], dtype=dt[data["id_dtype"]["user"]])
        items = pl.Series("item_id", data["items"], dtype=dt[data["id_dtype"]["item"]])
        vocab = cls(users=users, items=items)
        if vocab.mask != data["mask"]:
            raise ValueError(f"{path}: mask index {data['mask']} does not match {vocab.n_items} items")
        return vocab


def _lookup(ids: pl.Series, raw: pl.Series | list, offset: int, strict: bool, kind: str) -> np.ndarray:
    """Dense indices for raw ids; unknown ids raise (strict) or map to -1."""
    raw = pl.Series(raw) if not isinstance(raw, pl.Series) else raw
    try:
        raw = raw.cast(ids.dtype, strict=True)
    except pl.exceptions.InvalidOperationError:
        if strict:
            raise KeyError(f"{kind} ids {raw.head(5).to_list()} are not of type {ids.dtype}") from None
        return np.full(len(raw), -1, dtype=np.int64)
    if raw.null_count():  # no id (a forgotten user's slot): never found; the others exactly (not as floats)
        if strict:
            raise KeyError(f"{kind} ids include nulls")
        present = raw.is_not_null().to_numpy()
        out = np.full(len(raw), -1, dtype=np.int64)
        out[present] = _lookup(ids, raw.drop_nulls(), offset, strict, kind)
        return out
    if ids.null_count() or not ids.is_sorted():
        # an append-only vocabulary (its forgotten users' slots are null): search a sorted copy of its ids,
        # map back to the positions
        order = ids.arg_sort()
        if ids.null_count():
            order = order.filter(ids.gather(order).is_not_null())
        found_at = _lookup(ids.gather(order), raw, 0, strict, kind)
        out = np.full(len(found_at), -1, dtype=np.int64)
        ok = found_at >= 0
        out[ok] = order.to_numpy()[found_at[ok]] + offset
        return out
    pos = ids.search_sorted(raw).to_numpy().astype(np.int64)  # insertion points into the sorted ids
    found = pos < len(ids)
    found[found] = ids.gather(pos[found]).to_numpy() == raw.filter(pl.Series(found)).to_numpy()
    if strict and not found.all():
        missing = raw.filter(pl.Series(~found)).head(5).to_list()
        raise KeyError(f"unknown {kind} id(s) {missing}")
    return np.where(found, pos + offset, -1)
