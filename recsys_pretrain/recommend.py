"""Recommendations from a trained model and its candidate index, in the caller's raw ids.

    rec = Recommender.load("data/runs/mf-x/model", index="data/index")   # or a run id, models:/NAME@ALIAS
    rec.recommend(["u1", "u2"], k=10)              # known users: their trained vectors
    rec.recommend_for_history([["i3", "i9"]], k=10)  # an anonymous session: the model encodes the items
    rec.similar_items(["i3"], k=10)

Every call is batched (a list of queries in, a list of `Answer`s out). Items the user has seen are
never returned: the index is asked for k + |seen| candidates and the seen ones dropped (more are fetched
if a category filter removes too many). An unknown user gets the most popular items, flagged as a
fallback. Scores are the model's own (an inner product), or the re-ranker's when one is attached.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch

from recsys_pretrain import privacy
from recsys_pretrain.checkpoint import load_model_dir
from recsys_pretrain.config import IndexConfig
from recsys_pretrain.index import (
    IndexMismatchError,
    ItemIndex,
    build_index,
    load_index,
    sha256_array,
)
from recsys_pretrain.registry import resolve_model_dir
from recsys_pretrain.vocab import Vocab

log = logging.getLogger(__name__)

DEFAULT_MAX_K = 1000
# A category filter keeping at most this many items scores them all exactly instead of over-fetching
# from the index (which could take log2(n / k) searches for a rare category).
BRUTE_FORCE_MAX_ITEMS = 50_000

# reranker(user_ids, candidates) -> scores: per query the raw user id (None for an anonymous history)
# and its candidate raw item ids; returns one score array per query (higher first; NaN = no opinion).
Reranker = Callable[[list, list[list]], list[np.ndarray]]


@dataclass(frozen=True)
class Answer:
    """One query's recommendations, best first."""

    ids: list  # raw item ids
    scores: list[float]  # the model's scores (the re-ranker's when `reranked`)
    method: str  # user_vector | bert4rec_history | mean_item_vector | item_vector | popularity | none
    fallback: str | None = None  # why popularity (or nothing) was served: unknown_user | no_known_items | unknown_item
    unknown: list = field(default_factory=list)  # ids in the query the vocabulary does not know
    reranked: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["items"] = [{"item_id": i, "score": s} for i, s in zip(self.ids, self.scores, strict=True)]
        del out["ids"], out["scores"]
        return out


class Recommender:
    """Read-only after construction, so one instance serves many threads at once."""

    def __init__(self, model: torch.nn.Module, meta: dict, vocab: Vocab, index: ItemIndex,
                 user_vectors: np.ndarray, histories: sp.csr_matrix, popularity: np.ndarray, *,
                 categories: np.ndarray | None = None, category_names: list[str] | None = None,
                 reranker: Reranker | None = None, reranker_name: str | None = None, rerank_pool: int = 100,
                 max_k: int = DEFAULT_MAX_K, source: dict | None = None, user_key: bytes | None = None,
                 user_id_type: str = "str"):
        if index.n_items != vocab.n_items:
            raise IndexMismatchError(f"index has {index.n_items} items, the model's vocabulary {vocab.n_items}")
        if user_vectors.shape != (vocab.n_users, index.dim):
            raise ValueError(f"user vectors {user_vectors.shape}, expected ({vocab.n_users}, {index.dim})")
        if histories.shape != (vocab.n_users, vocab.n_items + 1):
            raise ValueError(f"histories {histories.shape}, expected ({vocab.n_users}, {vocab.n_items + 1})")
        if max_k < 1:
            raise ValueError(f"max_k must be >= 1, got {max_k}")
        _check_id_type(user_id_type)
        self.model, self.meta, self.vocab, self.index = model, meta, vocab, index
        self._users, self._items = _IdMap(vocab.users, 0), _IdMap(vocab.items, 1)
        self.user_vectors = user_vectors  # (n_users, d)
        self.histories = histories.tocsr()  # (n_users, n_items + 1) what each user has seen
        self.popularity = np.asarray(popularity, dtype=np.float32)  # (n_items,)
        self.pop_order = np.argsort(-self.popularity, kind="stable") + 1  # item indices, most popular first
        self.categories = categories  # (n_items + 1,) category code per item index, -1 = none
        self.category_names = category_names or []
        self._category_code = {c: i for i, c in enumerate(self.category_names)}
        self.reranker, self.reranker_name, self.rerank_pool = reranker, reranker_name, rerank_pool
        self.max_k = max_k
        self.source = source or {}
        # privacy: with the key user ids were pseudonymised with at ingest, callers' raw ids are hashed first,
        # as ingest hashed them: canonical text, integers as their decimal digits when the ids were integers
        self._user_key = user_key
        self._user_id_type = user_id_type

    # ---- construction -----------------------------------------------------------------------------------------
    @classmethod
    def load(cls, model: str | Path, index: str | Path | None = None, *, tracking_uri: str | None = None,
             categories: str | Path | None = None, reranker: Reranker | None = None,
             reranker_name: str | None = None, rerank_pool: int = 100, max_k: int = DEFAULT_MAX_K,
             index_config: IndexConfig | None = None, cache_dir: str | Path | None = None,
             user_key: bytes | None = None, user_id_type: str = "str") -> Recommender:
        """A model (directory, MLflow run id, runs:/RUN_ID or models:/NAME@ALIAS) with its index directory,
        which must have been built from this model's item vectors (checked); without one, an exact index
        is built in memory. `categories`: a table with item_id and category_id columns (e.g. the ingested
        events.parquet) enabling the category filter. `user_key`: see `with_user_key`; `user_id_type`: the
        ingest format's id type ("int": a raw id "0042" is user 42, as ingest read it)."""
        model_dir = resolve_model_dir(model, tracking_uri, cache_dir)
        net, meta, vocab = load_model_dir(model_dir)
        items = np.load(model_dir / "item_embeddings.npy")
        sha = sha256_array(items)
        if index is None:
            cfg = index_config or IndexConfig(factory="Flat")
            item_index = build_index(items, vocab, cfg, model={"run_id": meta.get("run_id"), "model": meta["model"],
                                                               "dataset": meta.get("dataset"),
                                                               "source": str(model)})
        else:
            # The index must be this model's: same item vectors, bit for bit.
            item_index = load_index(index, expect={"embeddings_sha256": sha, "n_items": vocab.n_items})
        cats, names = (load_item_categories(categories, vocab) if categories is not None else (None, None))
        return cls(net, meta, vocab, item_index, np.load(model_dir / "user_embeddings.npy"),
                   sp.load_npz(model_dir / "histories.npz"), np.load(model_dir / "popularity.npy"),
                   categories=cats, category_names=names, reranker=reranker, reranker_name=reranker_name,
                   rerank_pool=rerank_pool, max_k=max_k, user_key=user_key, user_id_type=user_id_type,
                   source={"model": str(model), "model_dir": str(model_dir),
                           "index": str(index) if index is not None else None})

    def with_user_key(self, key: bytes | None, id_type: str | None = None) -> Recommender:
        """This recommender (sharing its arrays) taking raw user ids hashed with `key`, the key the data was
        pseudonymised with (privacy.load_key); None: user ids are looked up as given. `id_type`: the ingest
        format's id type ("str" | "int", which hashes "0042" as "42"); None keeps this recommender's."""
        if id_type is not None:
            _check_id_type(id_type)
        other = copy.copy(self)
        other._user_key = key
        if id_type is not None:
            other._user_id_type = id_type
        return other

    def metadata(self) -> dict[str, Any]:
        m = self.index.meta
        return {
            "model": {k: self.meta.get(k) for k in ("model", "run_id", "dataset", "n_users", "n_items", "test")},
            "index": {k: m.get(k) for k in ("resolved_factory", "metric", "mips", "dim", "n_items", "search",
                                            "recall", "run_id", "created", "index_sha256", "embeddings_sha256")},
            "source": self.source,
            "max_k": self.max_k,
            "categories": len(self.category_names) if self.categories is not None else None,
            "reranker": self.reranker_name if self.reranker is not None else None,
            "reranker_note": None if self.reranker is not None else
            "no re-ranker attached: candidates are in the pretrained model's order",
        }

    # ---- queries ---------------------------------------------------------------------------------------------
    def recommend(self, user_ids: Sequence, k: int = 10, *, category: str | None = None,
                  exclude_seen: bool = True) -> list[Answer]:
        """Top-k unseen items for each known user (their trained vector as the query); popular items,
        flagged `fallback="unknown_user"`, for a user the model does not know. With a user key
        (`load(user_key=...)`, `with_user_key`) the ids are raw ones, hashed as ingest hashed them."""
        k = self._check_k(k)
        allowed = self._allowed(category)
        lookup = list(user_ids)
        if self._user_key is not None:  # privacy: the vocabulary holds tokens; hash the raw ids the same way
            lookup = privacy.pseudonymise_ids(lookup, self._user_key, self._user_id_type)
        users = self._users.index(lookup)  # (b,) -1 = unknown
        known = np.flatnonzero(users >= 0)
        answers: list[Answer | None] = [None] * len(users)
        if len(known):
            u = users[known]
            seen = [self._seen(x) for x in u] if exclude_seen else [np.zeros(0, np.int64)] * len(u)
            ctx = self.vocab.user_ids(u)  # raw ids in the vocabulary's type ("17" from a URL -> 17)
            for i, ans in zip(known, self._retrieve(self.user_vectors[u], k, seen, allowed, ctx, "user_vector"),
                              strict=True):
                answers[i] = ans
        for i in np.flatnonzero(users < 0):
            answers[i] = self._popular(k, np.zeros(0, np.int64), allowed, "unknown_user", unknown=[user_ids[i]])
        return answers  # type: ignore[return-value]

    def recommend_for_history(self, histories: Sequence[Sequence], k: int = 10, *,
                              category: str | None = None) -> list[Answer]:
        """Top-k for anonymous or fresh sessions: each history (raw item ids, oldest first) is encoded by the
        model (BERT4Rec: the Transformer over the items then [MASK]; MF, which has no encoder: the mean of
        the items' vectors). The given items are excluded; unknown ones are ignored and listed."""
        k = self._check_k(k)
        allowed = self._allowed(category)
        if isinstance(histories, (str, bytes)) or any(isinstance(h, (str, bytes, int)) for h in histories):
            raise ValueError("histories must be a list of histories (each a list of item ids)")
        idx = [self._items.index(list(h)) for h in histories]
        answers: list[Answer | None] = [None] * len(idx)
        rows = [r for r, h in enumerate(idx) if (h > 0).any()]
        if rows:
            known = [idx[r][idx[r] > 0] for r in rows]
            queries, method = self._encode(known)  # (b, d)
            unknowns = [[x for x, j in zip(histories[r], idx[r], strict=True) if j < 0] for r in rows]
            seen = [np.unique(h) for h in known]
            got = self._retrieve(queries, k, seen, allowed, [None] * len(rows), method)
            for r, ans, unk in zip(rows, got, unknowns, strict=True):
                answers[r] = Answer(ans.ids, ans.scores, ans.method, None, unk, ans.reranked)
        for r in range(len(idx)):
            if answers[r] is None:
                answers[r] = self._popular(k, np.zeros(0, np.int64), allowed, "no_known_items",
                                           unknown=list(histories[r]))
        return answers  # type: ignore[return-value]

    def similar_items(self, item_ids: Sequence, k: int = 10, *, category: str | None = None) -> list[Answer]:
        """Items whose vectors have the largest dot product with each item's vector (the bias coordinate
        left out, so popularity does not decide similarity); the item itself is excluded. An unknown item
        gets an empty answer flagged `fallback="unknown_item"`."""
        k = self._check_k(k)
        allowed = self._allowed(category)
        idx = self._items.index(list(item_ids))
        answers: list[Answer | None] = [None] * len(idx)
        known = np.flatnonzero(idx > 0)
        if len(known):
            q = np.array(self.index.vectors[idx[known] - 1], dtype=np.float32)  # (b, d)
            q[:, -1] = 0.0  # drop the bias coordinate from the query
            got = self._retrieve(q, k, [idx[i : i + 1] for i in known], allowed, [None] * len(known), "item_vector",
                                 rerank=False)
            for i, ans in zip(known, got, strict=True):
                answers[i] = ans
        for i in np.flatnonzero(idx <= 0):
            answers[i] = Answer([], [], "none", "unknown_item", [item_ids[i]])
        return answers  # type: ignore[return-value]

    # ---- internals ---------------------------------------------------------------------------------------------
    def _check_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ValueError(f"k must be an integer, got {k!r}")
        if not 1 <= k <= self.max_k:
            raise ValueError(f"k must be between 1 and {self.max_k}, got {k}")
        return int(k)

    def _allowed(self, category: str | None) -> np.ndarray | None:
        """(n_items + 1,) bool mask of the items in `category`, or None for no filter."""
        if category is None:
            return None
        if self.categories is None:
            raise ValueError("category: no item categories are loaded (pass categories= / serve.categories)")
        code = self._category_code.get(str(category))
        if code is None:
            raise ValueError(f"category: unknown category {category!r}")
        return self.categories == code

    def _seen(self, user: int) -> np.ndarray:
        h = self.histories
        return h.indices[h.indptr[user] : h.indptr[user + 1]].astype(np.int64)

    def _encode(self, histories: list[np.ndarray]) -> tuple[np.ndarray, str]:
        """(b, d) query vectors for item-index histories, and how they were made."""
        with torch.no_grad():
            q = self.model.encode(histories).cpu().numpy()  # (b, d)
        return np.ascontiguousarray(q, dtype=np.float32), self.model.encode_method

    def _retrieve(self, queries: np.ndarray, k: int, seen: list[np.ndarray], allowed: np.ndarray | None,
                  ctx: list, method: str, rerank: bool = True) -> list[Answer]:
        """Top-k per query from the index, minus `seen`, within `allowed`; then the re-ranker, if any."""
        want = k
        use_reranker = rerank and self.reranker is not None
        if use_reranker:
            want = max(k, self.rerank_pool)
        if allowed is not None and int(allowed.sum()) <= BRUTE_FORCE_MAX_ITEMS:
            labels, scores = self._scan(queries, np.flatnonzero(allowed), want, seen)
        else:
            labels, scores = self._overfetch(queries, want, seen, allowed)
        out = []
        for lab, sc in zip(labels, scores, strict=True):
            out.append(Answer(self._items.raw(lab), sc.tolist(), method))
        if use_reranker:
            out = self._rerank(out, ctx, k)
        return out

    def _scan(self, queries: np.ndarray, items: np.ndarray, want: int, seen: list[np.ndarray]):
        """Exact scores over a small item subset (a category): no index needed."""
        vecs = np.asarray(self.index.vectors[items - 1], dtype=np.float32)  # (m, d)
        all_scores = queries @ vecs.T  # (b, m)
        labels, scores = [], []
        for row, s in zip(seen, all_scores, strict=True):
            keep = ~np.isin(items, row)
            lab, sc = items[keep], s[keep]
            top = np.argsort(-sc, kind="stable")[:want]
            labels.append(lab[top])
            scores.append(sc[top])
        return labels, scores

    def _overfetch(self, queries: np.ndarray, want: int, seen: list[np.ndarray], allowed: np.ndarray | None):
        """Ask the index for want + |seen| candidates, drop seen / disallowed ones; rows still short (a
        category filter) are asked again for twice as many, up to the whole catalogue. A graph index may not
        reach every item even then (HNSW over many identical vectors, such as items without training events):
        rows still short are scored exactly over what they may get."""
        n = self.index.n_items
        labels: list[np.ndarray] = [np.zeros(0, np.int64)] * len(queries)
        scores: list[np.ndarray] = [np.zeros(0, np.float32)] * len(queries)
        pending = np.arange(len(queries))
        extra = max((len(s) for s in seen), default=0)
        fetch = min(n, want + extra if allowed is None else max(want + extra, 4 * want))
        while len(pending):
            lab, sc = self.index.search(queries[pending], fetch)  # (p, fetch)
            still = []
            for j, r in enumerate(pending):
                ok = lab[j] > 0
                ok &= ~np.isin(lab[j], seen[r])
                if allowed is not None:
                    ok &= allowed[np.maximum(lab[j], 0)]
                labels[r], scores[r] = lab[j][ok][:want], sc[j][ok][:want]
                if len(labels[r]) < want:
                    still.append(r)
            pending = np.asarray(still, dtype=np.int64)
            if len(pending) and fetch >= n:  # the whole catalogue was asked for and some rows are still short
                items = np.arange(1, n + 1) if allowed is None else np.flatnonzero(allowed[1:]) + 1
                for r in pending:
                    (labels[r],), (scores[r],) = self._scan(queries[r : r + 1], items, want, [seen[r]])
                break
            fetch = min(n, fetch * 2)
        return labels, scores

    def _popular(self, k: int, seen: np.ndarray, allowed: np.ndarray | None, why: str, unknown: list) -> Answer:
        order = self.pop_order
        if allowed is not None:
            order = order[allowed[order]]
        if len(seen):
            order = order[~np.isin(order, seen)]
        top = order[:k]
        return Answer(self._items.raw(top), self.popularity[top - 1].tolist(),
                      "popularity", why, unknown)

    def _rerank(self, answers: list[Answer], ctx: list, k: int) -> list[Answer]:
        new = self.reranker([c for c in ctx], [a.ids for a in answers])  # type: ignore[misc]
        out = []
        for a, s in zip(answers, new, strict=True):
            s = np.asarray(s, dtype=np.float64)
            if len(s) != len(a.ids):
                raise ValueError(f"re-ranker returned {len(s)} scores for {len(a.ids)} candidates")
            if len(s) == 0 or np.isnan(s).all():  # the ranker has no opinion (e.g. an anonymous user)
                out.append(Answer(a.ids[:k], a.scores[:k], a.method, a.fallback, a.unknown, False))
                continue
            order = np.argsort(-np.nan_to_num(s, nan=-np.inf), kind="stable")[:k]
            out.append(Answer([a.ids[i] for i in order], [float(s[i]) for i in order], a.method, a.fallback,
                              a.unknown, True))
        return out


# ---- helpers ------------------------------------------------------------------------------------------------
_INT = re.compile(r"^[+-]?\d+$")


def _check_id_type(id_type: str) -> None:
    if id_type not in ("str", "int"):
        raise ValueError(f"user_id_type must be 'str' or 'int', got {id_type!r}")


def _coerce(x: Any, as_int: bool) -> Any:
    """A raw id as the vocabulary's type, or None when it cannot be one (never raises: bad ids are unknown)."""
    if isinstance(x, bool):
        return None
    if as_int:
        if isinstance(x, (int, np.integer)):
            return int(x) if -(2**63) <= int(x) < 2**63 else None
        if isinstance(x, str) and _INT.match(x.strip()):
            v = int(x)
            return v if -(2**63) <= v < 2**63 else None
        return None
    if isinstance(x, str):
        return x
    return str(x) if isinstance(x, (int, np.integer)) else None


class _IdMap:
    """Raw id <-> dense index with NumPy binary search over the vocabulary's sorted ids. Per request this
    replaces Vocab's Polars lookups, whose fixed cost (~0.5 ms a call, measured) exceeded the rest of a
    single-user request."""

    def __init__(self, ids: pl.Series, offset: int):
        self.offset = offset
        self.as_int = ids.dtype == pl.Int64
        self._dict = None
        if ids.null_count():  # the null slots of forgotten users (an append-only vocabulary): a dict
            self.ids = np.array(ids.to_list(), dtype=object)
            self._dict = {v: i for i, v in enumerate(self.ids.tolist()) if v is not None}
            return
        self.ids = ids.to_numpy() if self.as_int else np.array(ids.to_list(), dtype=object)  # sorted
        if len(self.ids) > 1 and not (self.ids[:-1] < self.ids[1:]).all():  # Polars' and Python's orders differ
            self._dict = {v: i for i, v in enumerate(self.ids.tolist())}

    def index(self, raw: list) -> np.ndarray:
        """(b,) indices (offset applied), -1 for an unknown id or one of the wrong type."""
        out = np.full(len(raw), -1, dtype=np.int64)
        conv = [_coerce(x, self.as_int) for x in raw]
        ok = [i for i, x in enumerate(conv) if x is not None]
        if not ok or not len(self.ids):
            return out
        if self._dict is not None:
            for i in ok:
                j = self._dict.get(conv[i])
                out[i] = -1 if j is None else j + self.offset
            return out
        vals = np.array([conv[i] for i in ok], dtype=self.ids.dtype)
        pos = np.searchsorted(self.ids, vals)  # (m,) insertion points
        hit = (pos < len(self.ids)) & (self.ids[np.minimum(pos, len(self.ids) - 1)] == vals)
        out[np.asarray(ok)[hit]] = pos[hit] + self.offset
        return out

    def raw(self, index: np.ndarray) -> list:
        return self.ids[np.asarray(index, dtype=np.int64) - self.offset].tolist()


def load_item_categories(path: str | Path, vocab: Vocab) -> tuple[np.ndarray, list[str]]:
    """(n_items + 1,) category code per item index (-1 = none) and the category names, from a table with
    item_id and category_id columns; an item listed under several categories takes its most frequent."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"categories table {path} does not exist")
    lf = pl.scan_parquet(path) if path.suffix == ".parquet" else pl.scan_csv(path)
    cols = lf.collect_schema().names()
    for c in ("item_id", "category_id"):
        if c not in cols:
            raise ValueError(f"categories table {path}: no {c} column (has {cols})")
    df = (lf.select("item_id", pl.col("category_id").cast(pl.String)).drop_nulls()
          .group_by("item_id", "category_id").len()
          .sort(["item_id", "len", "category_id"], descending=[False, True, False])
          .unique("item_id", keep="first", maintain_order=True).collect())
    names = sorted(df["category_id"].unique().to_list())
    code = {c: i for i, c in enumerate(names)}
    idx = vocab.item_index(df["item_id"], strict=False)  # -1: not in the vocabulary
    cats = np.full(vocab.n_items + 1, -1, dtype=np.int64)
    keep = idx > 0
    cats[idx[keep]] = np.array([code[c] for c in df["category_id"].to_list()], dtype=np.int64)[keep]
    return cats, names


def pyfunc_reranker(model, column: str = "p_ctcvr") -> Reranker:
    """A Reranker over an MLflow pyfunc that scores a table of (user_id, item_id) raw-id pairs, returning
    either scores or a table (`column` is taken). An anonymous query (user None) gets NaN: no opinion."""
    import pandas as pd  # installed with mlflow; only a pyfunc re-ranker needs it

    def rerank(users: list, candidates: list[list]) -> list[np.ndarray]:
        rows = [(u, i) for u, items in zip(users, candidates, strict=True) if u is not None for i in items]
        scores = np.asarray([], dtype=np.float64)
        if rows:
            pred = model.predict(pd.DataFrame(rows, columns=["user_id", "item_id"]))
            pred = pred[column] if hasattr(pred, "columns") else pred
            scores = np.asarray(pred, dtype=np.float64).ravel()
        out, pos = [], 0
        for u, items in zip(users, candidates, strict=True):
            if u is None:
                out.append(np.full(len(items), np.nan))
            else:
                out.append(scores[pos : pos + len(items)])
                pos += len(items)
        return out

    return rerank


def answers_json(answers: list[Answer]) -> str:
    return json.dumps([a.to_dict() for a in answers], default=str)
