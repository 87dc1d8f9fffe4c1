"""The candidate index: FAISS over a trained model's item vectors, with recall measured, not assumed.

A user vector dotted with an item vector IS the model's score (the item bias rides along as the last
coordinate, met by a constant 1 in the user vector), so maximum-inner-product search over the item
vectors with the user vector as query returns the model's own top-k. Exact search (`Flat`) is the
ground truth; an approximate index (HNSW, IVF) is built from a `faiss.index_factory` string, its
recall@10 / recall@100 against exact search is measured on a sample of the model's real user vectors,
and its search-time knob (`efSearch` / `nprobe`) is set to the cheapest value that reaches the target.

    index_dir/
      index.faiss            an IndexIDMap2 whose labels are vocabulary item indices (1..n_items)
      index.json             metadata: model run, dims, metric, counts, build and search parameters,
                             measured recall, sha256 of the index file and of the item vectors
      item_embeddings.npy    (n_items, d) the item vectors it was built from (exact re-scoring, queries)
      vocab.json             raw id <-> index (the id map back to the caller's raw ids)
      index.ivfdata          only for a sharded build: the merged on-disk inverted lists (codes + ids)

Loading checks every one of those against the metadata and refuses a mismatch by name.

Large catalogues (`build_sharded_index`; `factory: auto` above `auto_compressed_min_items`): an IVF index with
compressed codes (PQ by default; SQ8 / SQfp16 also merge) is trained on a sample of the items, the items are
added in shards by parallel processes (concurrent.futures), each shard written as its own index file, and
the shards are merged into one on-disk inverted-list file (faiss.contrib.ondisk.merge_ondisk). index.faiss is
then a bare IVF index (its labels are the item indices; no IDMap) whose lists live in index.ivfdata, which
the service memory-maps read-only. The codes only choose candidates: `refine_factor` x k of them are
re-ranked by the exact inner product from item_embeddings.npy (memory-mapped), so the answers are the
model's own scores. `meta["memory"]` records the bytes per item of the codes and of the index files, and
`meta["recall"]` what they cost (with and without the re-ranking), so memory can be chosen against recall.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import resource
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import psutil

from recsys_pretrain.config import IndexConfig
from recsys_pretrain.io import atomic_dir, check_output, sha256_file
from recsys_pretrain.registry import resolve_model_dir
from recsys_pretrain.vocab import Vocab

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
META_FILE = "index.json"
VECTORS_FILE = "item_embeddings.npy"
VOCAB_FILE = "vocab.json"
IVFDATA_FILE = "index.ivfdata"
# how the service reads a merged on-disk index: the lists memory-mapped read-only, their file looked up next
# to index.faiss (not at the path it was written to). IO_FLAG_MMAP itself crashes searches on on-disk lists.
# IVF-PQ's precomputed table (nlist x m x 256 floats: 553 MB, 55 bytes per item, at 10M items) is not built:
# the per-list distance tables it saves cost microseconds at 64 d, and the results are the same.
ONDISK_READ_FLAGS = faiss.IO_FLAG_READ_ONLY | faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE
AUTO_REFINE_FACTOR = 10  # refine_factor 0 with compressed codes
PQ_RE = re.compile(r"PQ(\d+)")
RECALL_KS = (10, 100)
MIPS_MODES = ("ip", "l2")
# efSearch / nprobe candidates, cheapest first; tuning stops at the first that reaches the target.
EF_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


class IndexMismatchError(ValueError):
    """An index directory disagrees with its own metadata or with the model it is used with."""


def sha256_array(a: np.ndarray) -> str:
    """sha256 of an array's float32 C-order bytes (its shape included, so a reshape is a mismatch)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    h = hashlib.sha256(repr(a.shape).encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


# ---- the index ------------------------------------------------------------------------------------------------
def default_nlist(n_items: int) -> int:
    """IVF lists: about 4 sqrt(n) (FAISS's rule of thumb), a power of two, at least 1."""
    return max(1, int(2 ** round(np.log2(4 * np.sqrt(max(n_items, 1))))))


def resolve_factory(cfg: IndexConfig, n_items: int, dim: int | None = None, compressed: bool = False) -> str:
    """`auto`: exact Flat up to `cfg.auto_flat_max_items` (single-query brute force stays under ~1 ms there),
    `cfg.auto_factory` (IVF-Flat) up to `cfg.auto_compressed_min_items`, `cfg.auto_compressed_factory` (IVF-PQ,
    built in shards) above it, or whenever `compressed` (the sharded build). Anything else is passed to
    faiss.index_factory as written, `{nlist}` replaced by `default_nlist(n_items)` (so "IVF{nlist},Flat" scales
    with the catalogue) and, given the stored dimension `dim`, `{pq}` by ceil(dim / cfg.pq_dims)."""
    factory = cfg.factory
    if factory.strip().lower() == "auto":
        if compressed or n_items > cfg.auto_compressed_min_items:
            factory = cfg.auto_compressed_factory
        else:
            factory = "Flat" if n_items <= cfg.auto_flat_max_items else cfg.auto_factory
    factory = factory.replace("{nlist}", str(default_nlist(n_items)))
    if dim is not None:
        factory = factory.replace("{pq}", str(-(-dim // max(1, cfg.pq_dims))))
    return factory


def resolve_shards(cfg: IndexConfig, n_items: int) -> int:
    """0 = the in-memory build (`build_index`); k >= 1 = `build_sharded_index` with k shards. `cfg.shards` 0 is
    auto: ceil(n / shard_items), at least 2, above `auto_compressed_min_items`, else in memory."""
    if cfg.shards == 1:
        return 0
    if cfg.shards > 1:
        return cfg.shards
    if n_items > cfg.auto_compressed_min_items:
        return max(2, math.ceil(n_items / max(1, cfg.shard_items)))
    return 0


def _layout(cfg: IndexConfig, n_items: int, dim: int, compressed: bool = False) -> tuple[str, str, int]:
    """(factory, mips, index_dim) of an index over `dim`-dimensional vectors. The stored dimension is dim, +1
    for the l2 reduction, rounded up with zero columns to a multiple of every PQ sub-quantizer count in the
    factory (PQ m must divide the dimension; zero columns change neither distances nor inner products)."""
    factory = resolve_factory(cfg, n_items, compressed=compressed)
    exact = factory.replace(" ", "").lower() == "flat"
    mips = "ip" if exact else cfg.mips  # the reduction buys nothing for brute force
    stored = dim + (mips == "l2")
    factory = resolve_factory(cfg, n_items, dim=stored, compressed=compressed)
    multiple = math.lcm(1, *[int(m) for m in PQ_RE.findall(factory)])
    return factory, mips, -(-stored // multiple) * multiple


def _compressed(index: faiss.Index) -> bool:
    """Does the index rank by lossy codes (PQ, SQ, ...), rather than by the vectors themselves?"""
    inner = _inner(index)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        return not isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFlat)
    if hasattr(inner, "hnsw"):
        inner = faiss.downcast_index(inner.storage)
    return not isinstance(inner, faiss.IndexFlat)


def _refine_factor(cfg: IndexConfig, index: faiss.Index) -> int:
    if cfg.refine_factor < 0:
        raise ValueError(f"index.refine_factor must be >= 0, got {cfg.refine_factor}")
    if cfg.refine_factor:
        return int(cfg.refine_factor)
    return AUTO_REFINE_FACTOR if _compressed(index) else 1


def memory_per_item(index: faiss.Index, dim: int) -> dict:
    """Bytes per item the index holds: its codes, its ids, and the float32 vectors kept beside it for the
    exact re-ranking (memory-mapped: only the candidates' rows are read)."""
    inner = _inner(index)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        code, ids = int(ivf.code_size), 8
    else:
        storage = faiss.downcast_index(inner.storage) if hasattr(inner, "hnsw") else inner
        code = int(getattr(storage, "code_size", 0)) or None
        ids = 8 if isinstance(faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2)) else 0
    return {"code_bytes_per_item": code, "id_bytes_per_item": ids,
            "codes_and_ids_bytes_per_item": (code or 0) + ids, "vectors_bytes_per_item": 4 * dim}


def _inner(index: faiss.Index) -> faiss.Index:
    """The index under IDMap / pre-transform wrappers."""
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
        index = faiss.downcast_index(index.index)
    return index


def search_knob(index: faiss.Index) -> str | None:
    """The search-time parameter that trades recall for speed: efSearch (HNSW), nprobe (IVF), or None."""
    inner = _inner(index)
    if hasattr(inner, "hnsw"):
        return "efSearch"
    if faiss.try_extract_index_ivf(inner) is not None:
        return "nprobe"
    return None


def set_search_param(index: faiss.Index, value: int) -> None:
    """Set efSearch / nprobe on the index itself (it is saved with it). Call before serving, not during:
    searches running in other threads read the same field."""
    knob = search_knob(index)
    if knob is None:
        raise ValueError("this index has no search parameter to set (exact or flat-coded)")
    inner = _inner(index)
    if knob == "efSearch":
        inner.hnsw.efSearch = int(value)
    else:
        ivf = faiss.extract_index_ivf(inner)
        ivf.nprobe = int(min(value, ivf.nlist))


def get_search_param(index: faiss.Index) -> int | None:
    knob = search_knob(index)
    if knob == "efSearch":
        return int(_inner(index).hnsw.efSearch)
    if knob == "nprobe":
        return int(faiss.extract_index_ivf(_inner(index)).nprobe)
    return None


def _mips_items(vectors: np.ndarray, mips: str, max_norm: float | None = None,
                index_dim: int | None = None) -> tuple[np.ndarray, float]:
    """Vectors as stored in the index. `l2`: the reduction of maximum inner product to nearest neighbour
    (Bachrach et al. 2014): x -> [x, sqrt(M^2 - |x|^2)], queries q -> [q, 0], so that
    |q' - x'|^2 = |q|^2 + M^2 - 2 q.x ranks exactly as -q.x while the index sees a true metric. M is the
    largest norm of these vectors unless given (a shard of the items uses the whole catalogue's). Zero
    columns pad the result to `index_dim` (a PQ's sub-quantizer count must divide the dimension)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    width = index_dim or d + (mips == "l2")
    if mips == "ip":
        if width == d:
            return x, 0.0
        out = np.zeros((n, width), np.float32)
        out[:, :d] = x
        return out, 0.0
    norms2 = np.einsum("nd,nd->n", x, x, dtype=np.float64)  # (n,)
    m2 = float(norms2.max()) if len(norms2) else 0.0
    if max_norm is not None:
        m2 = float(max_norm) ** 2
    out = np.zeros((n, width), np.float32)
    out[:, :d] = x
    out[:, d] = np.sqrt(np.maximum(m2 - norms2, 0.0))
    return out, float(np.sqrt(m2))


class ItemIndex:
    """A FAISS index over item vectors whose labels are item indices; search returns exact model scores."""

    def __init__(self, index: faiss.Index, vectors: np.ndarray, vocab: Vocab, meta: dict):
        self.index = index
        self.vectors = vectors  # (n_items, d) row i-1 = item index i; may be a read-only memory map
        self.vocab = vocab
        self.meta = meta

    @property
    def n_items(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def mips(self) -> str:
        return self.meta.get("mips", "ip")

    @property
    def refine_factor(self) -> int:
        """FAISS candidates fetched per requested result, re-ranked exactly (1 = none beyond re-scoring)."""
        return max(1, int(self.meta.get("refine_factor") or 1))

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)  # (b, d)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index {self.dim}")
        extra = self.index.d - q.shape[1]  # the l2 reduction's coordinate and any padding: 0 in a query
        if extra > 0:
            q = np.ascontiguousarray(np.hstack([q, np.zeros((len(q), extra), np.float32)]))  # (b, index_dim)
        return q

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(b, d) queries -> (labels (b, k) item indices, -1 where fewer were found; scores (b, k) the exact
        inner products, -inf where no item), best first.

        Scores are recomputed from the stored vectors and the row re-sorted: an approximate index's own
        distances (L2 after the reduction, quantised codes) are not the model's score. With a refine factor
        r > 1, r * k candidates are fetched and the exact scores pick the best k of them."""
        k = int(min(k, self.n_items))
        q = self._queries(queries)
        _, labels = self.index.search(q, int(min(self.n_items, k * self.refine_factor)))  # (b, r k) int64
        labels, scores = self.rescore(queries, labels)
        return labels[:, :k], scores[:, :k]

    def rescore(self, queries: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of the given (b, m) item indices for each query, each row sorted best first."""
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))  # (b, d)
        valid = labels > 0
        scores = np.empty(labels.shape, np.float32)  # (b, m)
        step = max(1, (1 << 22) // max(1, labels.shape[1] * self.dim))  # rows per block: ~16 MB gathered
        for lo in range(0, len(labels), step):
            rows = self.vectors[np.where(valid[lo : lo + step], labels[lo : lo + step] - 1, 0)]  # (s, m, d)
            scores[lo : lo + step] = np.einsum("smd,sd->sm", rows, q[lo : lo + step])
        scores[~valid] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")  # (b, m)
        labels = np.take_along_axis(np.where(valid, labels, -1), order, axis=1)
        return labels, np.take_along_axis(scores, order, axis=1)

    def set_search_param(self, value: int) -> None:
        set_search_param(self.index, value)
        self.meta["search"] = {"param": search_knob(self.index), "value": int(value)}

    # ---- persistence ------------------------------------------------------------------------------------------
    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write the index directory atomically: readers see the previous index or this one, whole. An
        existing directory is replaced only if this project wrote it, or `force`."""
        with atomic_dir(path, force=force) as stage:
            faiss.write_index(self.index, str(stage / INDEX_FILE))
            ondisk = self.meta.get("ivfdata")
            if ondisk:  # the lists are in their own file, which write_index does not copy
                shutil.copyfile(_ondisk_filename(self.index), stage / ondisk)
            np.save(stage / VECTORS_FILE, np.ascontiguousarray(self.vectors, dtype=np.float32))
            self.vocab.save(stage / VOCAB_FILE)
            meta = dict(self.meta)
            meta["index_sha256"] = sha256_file(stage / INDEX_FILE)
            _record_size(meta, stage, self.index)
            (stage / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        self.meta = meta
        return Path(path)


def _ondisk_filename(index: faiss.Index) -> str:
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(_inner(index)).invlists)
    return str(invlists.filename)


def _record_size(meta: dict, directory: Path, index: faiss.Index) -> None:
    """index_bytes (index.faiss plus its on-disk lists) and the bytes per item, into `meta`."""
    files = [INDEX_FILE] + ([meta["ivfdata"]] if meta.get("ivfdata") else [])
    meta["index_bytes"] = sum((directory / f).stat().st_size for f in files)
    n = max(1, int(meta["n_items"]))
    meta["memory"] = {**memory_per_item(index, int(meta["dim"])), "index_bytes_per_item": meta["index_bytes"] / n}


def load_index(path: str | Path, expect: dict | None = None, verify: bool = True, mmap: bool = True) -> ItemIndex:
    """Load an index directory, checking its files against index.json, and index.json against `expect`
    ({field: value}, e.g. the serving model's `embeddings_sha256`). Raises IndexMismatchError naming the
    field that disagrees. On-disk inverted lists (a sharded build) are memory-mapped read-only."""
    path = Path(path)
    if not (path / META_FILE).exists():
        raise FileNotFoundError(f"{path}: not an index directory (no {META_FILE})")
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise IndexMismatchError(f"{path}: format_version {meta.get('format_version')!r}, this code reads "
                                 f"{FORMAT_VERSION}; rebuild the index")
    ondisk = meta.get("ivfdata")
    for name in (INDEX_FILE, VECTORS_FILE, VOCAB_FILE) + ((ondisk,) if ondisk else ()):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path}: {name} is missing")
    if verify:
        for name, key in ((INDEX_FILE, "index_sha256"),) + (((ondisk, "ivfdata_sha256"),) if ondisk else ()):
            found = sha256_file(path / name)
            if found != meta[key]:
                raise IndexMismatchError(f"{path}: {key} of {name} is {found[:12]}..., index.json says "
                                         f"{meta[key][:12]}...: the file was replaced or is corrupt")
    index = faiss.read_index(str(path / INDEX_FILE), ONDISK_READ_FLAGS if ondisk else 0)
    vectors = np.load(path / VECTORS_FILE, mmap_mode="r" if mmap else None)
    vocab = Vocab.load(path / VOCAB_FILE)
    _check(path, "n_items", meta["n_items"], index.ntotal, f"{INDEX_FILE} holds")
    _check(path, "n_items", meta["n_items"], vectors.shape[0], f"{VECTORS_FILE} has rows")
    _check(path, "n_items", meta["n_items"], vocab.n_items, f"{VOCAB_FILE} has items")
    _check(path, "dim", meta["dim"], vectors.shape[1], f"{VECTORS_FILE} has columns")
    _check(path, "index_dim", meta["index_dim"], index.d, f"{INDEX_FILE} has dimension")
    if verify:
        _check(path, "embeddings_sha256", meta["embeddings_sha256"], sha256_array(vectors), f"{VECTORS_FILE} hashes to")
    for key, want in (expect or {}).items():
        have = meta.get(key)
        if have != want:
            built = (meta.get("model") or {}).get("run_id")
            raise IndexMismatchError(f"{path}: {key} is {have!r}, expected {want!r} (the index was built from "
                                     f"model run {built!r}); rebuild it with `recsys-pretrain index`")
    knob = (meta.get("search") or {}).get("value")
    if knob is not None and search_knob(index) is not None:
        set_search_param(index, knob)  # the saved index carries it too; the metadata is the record
    return ItemIndex(index, vectors, vocab, meta)


def _check(path: Path, field: str, want, have, what: str) -> None:
    if want != have:
        raise IndexMismatchError(f"{path}: index.json {field} = {want}, but {what} {have}")


# ---- exact search and recall -----------------------------------------------------------------------------
def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int, batch: int = 1024,
               block: int = 1 << 20) -> np.ndarray:
    """(b, k) item indices (1-based) of the exact top-k inner products: the ground truth. Above `block` items
    the items are searched a block at a time (a memory map is never copied whole) and the per-block top-k
    merged in a heap (faiss.contrib.exhaustive_search.knn_ground_truth)."""
    if len(vectors) > block and len(queries):
        from faiss.contrib.exhaustive_search import knn_ground_truth

        blocks = (np.ascontiguousarray(vectors[i : i + block], dtype=np.float32)
                  for i in range(0, len(vectors), block))
        q = np.ascontiguousarray(queries, dtype=np.float32)
        _, ids = knn_ground_truth(q, blocks, k, metric_type=faiss.METRIC_INNER_PRODUCT)
        return ids.astype(np.int64) + 1
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
    q = np.ascontiguousarray(queries, dtype=np.float32)
    out = [flat.search(q[i : i + batch], k)[1] for i in range(0, len(q), batch)]
    return np.concatenate(out) + 1 if out else np.zeros((0, k), np.int64)


def recall_at(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean over queries of |found top-k ∩ exact top-k| / k."""
    if len(found) == 0:
        return float("nan")
    f, e = found[:, :k], exact[:, :k]
    hits = sum(len(np.intersect1d(a[a > 0], b)) for a, b in zip(f, e, strict=True))
    return hits / (len(f) * k)


def single_query_latency(index: ItemIndex, queries: np.ndarray, k: int = 10) -> dict[str, float]:
    """p50 / p99 milliseconds of one query at a time through ItemIndex.search, on one faiss thread as the
    service runs it (see ServeConfig.faiss_threads)."""
    times = np.empty(len(queries))
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        for i, q in enumerate(queries):
            t0 = time.perf_counter()
            index.search(q[None], k)
            times[i] = time.perf_counter() - t0
    finally:
        faiss.omp_set_num_threads(threads)
    if not len(times):
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    return {"p50_ms": float(np.percentile(times, 50) * 1e3), "p99_ms": float(np.percentile(times, 99) * 1e3)}


def measure_recall(index: ItemIndex, queries: np.ndarray, exact: np.ndarray) -> dict[str, float]:
    """recall@k for each k in RECALL_KS, each from a search for k results (as a caller asks for them): the top
    10 of a search for 100 can be better than a search for 10, which re-ranks fewer candidates."""
    out = {}
    for k in RECALL_KS:
        kk = min(k, index.n_items)
        labels, _ = index.search(queries, kk)
        out[f"recall_at_{k}"] = recall_at(labels, exact, kk)
    return out


def tune(index: ItemIndex, queries: np.ndarray, exact: np.ndarray, cfg: IndexConfig) -> list[dict]:
    """Walk efSearch / nprobe from cheap to expensive, measuring recall@10/@100 and single-query latency,
    and leave the index at the lowest-latency setting whose recall at every k in `cfg.tune_ks` reaches
    `cfg.target_recall` (the most accurate one tried when none does). Returns the measured curve.

    recall@100 is in the default target because serving over-fetches k + |seen items| candidates: an index
    tuned on recall@10 alone can be far worse at 100 (HNSW with efSearch 16 found under half the top 100
    in tests/test_index.py)."""
    knob = search_knob(index.index)
    if knob is None:
        return []
    if cfg.search_param is not None:
        grid = [cfg.search_param]
    elif knob == "efSearch":
        grid = list(EF_GRID)
    else:
        nlist = faiss.extract_index_ivf(_inner(index.index)).nlist
        grid = sorted({min(v, nlist) for v in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256,
                                                384, 512, 768, 1024, 2048, 4096, nlist)})
    lat_q = queries[: cfg.tune_latency_queries]
    curve = []
    for value in grid:
        index.set_search_param(value)
        row = {knob: int(value), **measure_recall(index, queries, exact), **single_query_latency(index, lat_q)}
        curve.append(row)
        log.info("tune %s", row)
        if _meets(row, cfg):
            break  # latency only grows from here
    ok = [r for r in curve if _meets(r, cfg)]
    best = min(ok, key=lambda r: r["p50_ms"]) if ok else max(curve, key=lambda r: _worst(r, cfg))
    index.set_search_param(best[knob])
    return curve


def _worst(row: dict, cfg: IndexConfig) -> float:
    return min(row[f"recall_at_{k}"] for k in cfg.tune_ks)


def _meets(row: dict, cfg: IndexConfig) -> bool:
    return _worst(row, cfg) >= cfg.target_recall


def build_index(vectors: np.ndarray, vocab: Vocab, cfg: IndexConfig, queries: np.ndarray | None = None,
                model: dict | None = None) -> ItemIndex:
    """Build (and, given sample `queries`, measure and tune) an index over `vectors` (n_items, d), row i-1 =
    item index i. `model` is provenance for the metadata ({"run_id", "model", "dataset", "source"})."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    _validate(cfg, n, vocab)
    if cfg.threads > 0:
        faiss.omp_set_num_threads(cfg.threads)
    factory, mips, index_dim = _layout(cfg, n, d)
    if factory.replace(" ", "").lower().startswith("idmap"):
        raise ValueError(f"index.factory {factory!r}: leave out IDMap, the id map is added here")
    exact = factory.replace(" ", "").lower() == "flat"
    stored, max_norm = _mips_items(vectors, mips, index_dim=index_dim)
    rss0 = _rss_mib()
    t0 = time.perf_counter()
    base = _factory_index(factory, index_dim, mips)
    inner = _inner(base)
    if hasattr(inner, "hnsw"):
        inner.hnsw.efConstruction = cfg.ef_construction  # before add: it shapes the graph
    train_size = None
    if not base.is_trained:  # IVF centroids, PQ / SQ codebooks: learnt from a sample of the items
        train_size = min(n, cfg.train_size)
        rng = np.random.default_rng(cfg.seed)
        sample = stored if n <= cfg.train_size else stored[np.sort(rng.choice(n, cfg.train_size, replace=False))]
        base.train(sample)
    index = faiss.IndexIDMap2(base)
    index.add_with_ids(stored, np.arange(1, n + 1, dtype=np.int64))  # labels = vocabulary item indices
    build_s = time.perf_counter() - t0
    meta = {
        **_meta(cfg, factory, model, mips, max_norm, d, int(stored.shape[1]), n, sha256_array(vectors), index),
        "memory": memory_per_item(index, d),
        "build": {"seconds": build_s, "rss_delta_mib": _rss_mib() - rss0,
                  "ef_construction": cfg.ef_construction if hasattr(inner, "hnsw") else None,
                  "train_size": train_size, "threads": faiss.omp_get_max_threads(), "seed": cfg.seed},
        "search": {"param": search_knob(index), "value": get_search_param(index)},
    }
    item_index = ItemIndex(index, vectors, vocab, meta)
    _measure(item_index, queries, cfg, tune_knob=not exact)
    return item_index


def _meta(cfg: IndexConfig, factory: str, model: dict | None, mips: str, max_norm: float, d: int, index_dim: int,
          n: int, sha: str, index: faiss.Index) -> dict:
    """What every index.json records, however the index was built."""
    return {
        "format_version": FORMAT_VERSION,
        "faiss_version": faiss.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": model or {},
        "factory": cfg.factory,
        "resolved_factory": factory,
        "metric": "inner_product",  # what the answers rank by, whatever the index stores
        "mips": mips,
        "max_norm": max_norm,
        "dim": d,
        "index_dim": index_dim,
        "n_items": n,
        "embeddings_sha256": sha,
        "refine_factor": _refine_factor(cfg, index),
    }


def _validate(cfg: IndexConfig, n: int, vocab: Vocab) -> None:
    if n != vocab.n_items:
        raise ValueError(f"{n} item vectors for a vocabulary of {vocab.n_items} items")
    if cfg.mips not in MIPS_MODES:
        raise ValueError(f"index.mips must be one of {MIPS_MODES}, got {cfg.mips!r}")
    if not 0 < cfg.target_recall <= 1:
        raise ValueError(f"index.target_recall must be in (0, 1], got {cfg.target_recall}")
    if not cfg.tune_ks or not set(cfg.tune_ks) <= set(RECALL_KS):
        raise ValueError(f"index.tune_ks must be a non-empty subset of {RECALL_KS}, got {cfg.tune_ks}")


def _factory_index(factory: str, index_dim: int, mips: str) -> faiss.Index:
    metric = faiss.METRIC_INNER_PRODUCT if mips == "ip" else faiss.METRIC_L2
    try:
        index = faiss.index_factory(index_dim, factory, metric)
    except RuntimeError as exc:
        raise ValueError(f"index.factory {factory!r} is not a valid faiss.index_factory string: {exc}") from None
    ivf = faiss.try_extract_index_ivf(index)
    ivf = faiss.downcast_index(ivf) if ivf is not None else None
    if isinstance(ivf, faiss.IndexIVFPQ):
        # the factory turns on polysemous training (a code order for Hamming pre-filtering, which is not used
        # here): it multiplies PQ training time ~10x (20 s instead of 2 on the tests' 20k items)
        ivf.do_polysemous_training = False
    return index


def _measure(item_index: ItemIndex, queries: np.ndarray | None, cfg: IndexConfig, tune_knob: bool = True) -> None:
    """Given sample `queries`: tune the search knob and record recall@10/@100 against exact search and
    single-query latency in the metadata, and, when candidates are re-ranked (refine_factor > 1), the
    recall of the codes alone (what the compression costs before the re-ranking wins it back)."""
    if queries is None or not len(queries):
        return
    meta, vectors = item_index.meta, item_index.vectors
    kmax = min(max(RECALL_KS), item_index.n_items)
    t0 = time.perf_counter()
    truth = exact_topk(vectors, queries, kmax)
    exact_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    curve = tune(item_index, queries, truth, cfg) if tune_knob else []
    recall = measure_recall(item_index, queries, truth)
    latency = single_query_latency(item_index, queries[: cfg.tune_latency_queries])
    meta["tuning"] = curve
    meta["tune_seconds"] = time.perf_counter() - t1
    meta["exact_seconds"] = exact_s
    meta["recall"] = {**recall, "queries": int(len(queries)), "target": cfg.target_recall,
                      "target_ks": list(cfg.tune_ks), "target_met": _meets(recall, cfg), **latency}
    if item_index.refine_factor > 1:
        rf = meta["refine_factor"]
        meta["refine_factor"] = 1
        try:
            meta["recall"]["without_refine"] = measure_recall(item_index, queries, truth)
        finally:
            meta["refine_factor"] = rf


def _rss_mib() -> float:
    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- the sharded build: a trained quantizer, items added by parallel processes, merged on disk ------------------
CHUNK_ROWS = 1 << 18  # rows transformed and added at a time (64 MB of float32 at 64 d)


def _add_shard(trained: str, vectors: str, lo: int, hi: int, mips: str, max_norm: float, index_dim: int,
               out: str, threads: int) -> dict:
    """One worker process: items lo..hi-1 (rows of the memory-mapped .npy; labels lo+1..hi) added to a copy of
    the trained, empty index, written to `out`."""
    faiss.omp_set_num_threads(max(1, threads))
    t0 = time.perf_counter()
    index = faiss.read_index(trained, faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE)  # adding does not use it
    x = np.load(vectors, mmap_mode="r")
    for a in range(lo, hi, CHUNK_ROWS):
        b = min(hi, a + CHUNK_ROWS)
        stored, _ = _mips_items(x[a:b], mips, max_norm=max_norm, index_dim=index_dim)
        index.add_with_ids(stored, np.arange(a + 1, b + 1, dtype=np.int64))
    faiss.write_index(index, out)
    # current RSS, not ru_maxrss: a spawned worker's ru_maxrss starts from its parent's peak (Linux keeps it
    # across fork and exec)
    return {"items": hi - lo, "seconds": time.perf_counter() - t0, "rss_end_mib": _rss_mib()}


def _copy_vectors(vectors: np.ndarray, out: Path, mips: str) -> tuple[str, float]:
    """Write `vectors` as float32 .npy to `out` a chunk at a time; return (sha256_array of them, max norm)."""
    import hashlib

    n, d = vectors.shape
    h = hashlib.sha256(repr((n, d)).encode())  # as sha256_array: the shape, then the C-order float32 bytes
    dst = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(n, d))
    m2 = 0.0
    for a in range(0, n, CHUNK_ROWS):
        x = np.ascontiguousarray(vectors[a : a + CHUNK_ROWS], dtype=np.float32)
        dst[a : a + len(x)] = x
        h.update(memoryview(x).cast("B"))
        if mips == "l2" and len(x):
            m2 = max(m2, float(np.einsum("nd,nd->n", x, x, dtype=np.float64).max()))
    dst.flush()
    del dst
    return h.hexdigest(), float(np.sqrt(m2))


def build_sharded_index(vectors: np.ndarray | str | Path, vocab: Vocab, cfg: IndexConfig, out: str | Path,
                        n_shards: int | None = None, queries: np.ndarray | None = None, model: dict | None = None,
                        force: bool = False, run_id: str | None = None) -> ItemIndex:
    """Build an IVF index with compressed codes over `vectors` (an (n_items, d) array, or the path of a .npy
    that is read memory-mapped, never whole), in shards, and write it to the index directory `out`.

    1. the vectors are copied (float32, a chunk at a time) into out/item_embeddings.npy;
    2. the coarse quantizer and the codebooks (PQ / SQ) are trained on `cfg.train_size` sampled items;
    3. the items are split into `n_shards` contiguous ranges (default `resolve_shards`), each added to a copy
       of the trained index by a worker process (`cfg.shard_workers` at once, concurrent.futures, spawned so
       no OpenMP state is forked: a calling script needs its `if __name__ == "__main__":` guard; one worker
       adds the shards in this process) and written as its own index file;
    4. the shards are merged into one on-disk inverted-list file, out/index.ivfdata (merge_ondisk);
    5. given sample `queries`, nprobe is tuned and recall measured as in `build_index`, on the merged index
       as the service reads it (memory-mapped).

    `cfg.factory` "auto" is `cfg.auto_compressed_factory`; any IVF factory whose lists FAISS can store on
    disk works (PQ, SQ8, SQfp16, Flat codes), but not fast-scan codes (`x4fs`, kept in blocks), a refine
    stage (`RFlat`, `Refine(...)`: the exact re-ranking here reads item_embeddings.npy instead) or a
    pre-transform. The result is identical to adding all items in one process to the same trained index:
    the merged lists hold each shard's items in shard order. Returns the index loaded from `out`."""
    src = Path(vectors) if isinstance(vectors, (str, Path)) else None
    items = np.load(src, mmap_mode="r") if src is not None else np.asarray(vectors)
    if items.ndim != 2:
        raise ValueError(f"item vectors must be (n_items, d), got shape {items.shape}")
    n, d = items.shape
    _validate(cfg, n, vocab)
    n_shards = int(n_shards or resolve_shards(cfg, n) or 1)
    if not 1 <= n_shards <= n:
        raise ValueError(f"n_shards must be in 1..{n}, got {n_shards}")
    factory, mips, index_dim = _layout(cfg, n, d, compressed=True)
    base = _factory_index(factory, index_dim, mips)
    top = faiss.downcast_index(base)
    if not isinstance(top, faiss.IndexIVF):
        raise ValueError(f"index.factory {factory!r}: a sharded build needs a bare IVF index (IVF...,PQ / SQ / "
                         f"Flat), got {type(top).__name__}")
    if isinstance(top, faiss.IndexIVFFastScan):
        raise ValueError(f"index.factory {factory!r}: fast-scan codes are stored in blocks that on-disk "
                         "inverted lists cannot merge; use 8-bit PQ (PQm) or SQ8")
    workers = max(1, min(n_shards, cfg.shard_workers or os.cpu_count() or 1))
    threads = cfg.threads if cfg.threads > 0 else faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    rss0 = _rss_mib()
    t0 = time.perf_counter()
    with atomic_dir(out, inputs=[src] if src is not None else [], force=force) as stage:
        vec_path = stage / VECTORS_FILE
        sha, max_norm = _copy_vectors(items, vec_path, mips)
        del items
        stored_items = np.load(vec_path, mmap_mode="r")
        copy_s = time.perf_counter() - t0

        t1 = time.perf_counter()
        train_size = min(n, cfg.train_size)
        rng = np.random.default_rng(cfg.seed)  # the same sample as build_index draws
        pick = np.arange(n) if n <= cfg.train_size else np.sort(rng.choice(n, cfg.train_size, replace=False))
        sample, _ = _mips_items(stored_items[pick], mips, max_norm=max_norm, index_dim=index_dim)
        base.train(sample)
        del sample
        work = stage / ".shards"
        work.mkdir()
        trained = work / "trained.faiss"
        faiss.write_index(base, str(trained))
        del base
        train_s = time.perf_counter() - t1

        t2 = time.perf_counter()
        bounds = np.linspace(0, n, n_shards + 1).astype(np.int64)
        shard_files = [str(work / f"shard-{i:04d}.faiss") for i in range(n_shards)]
        jobs = [(str(trained), str(vec_path), int(bounds[i]), int(bounds[i + 1]), mips, max_norm, index_dim,
                 shard_files[i], max(1, threads // workers)) for i in range(n_shards)]
        if workers == 1:  # one at a time: a worker process would only add its start-up
            shards = [_add_shard(*job) for job in jobs]
            faiss.omp_set_num_threads(threads)
        else:
            import multiprocessing

            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                shards = [f.result() for f in [pool.submit(_add_shard, *job) for job in jobs]]
        add_s = time.perf_counter() - t2

        t3 = time.perf_counter()
        from faiss.contrib.ondisk import merge_ondisk

        merged = faiss.read_index(str(trained), faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE)
        merge_ondisk(merged, shard_files, str(stage / IVFDATA_FILE))
        faiss.write_index(merged, str(stage / INDEX_FILE))
        del merged
        shutil.rmtree(work)
        merge_s = time.perf_counter() - t3
        vocab.save(stage / VOCAB_FILE)

        index = faiss.read_index(str(stage / INDEX_FILE), ONDISK_READ_FLAGS)  # as the service will read it
        meta = {
            **_meta(cfg, factory, model, mips, max_norm, d, index_dim, n, sha, index),
            "ivfdata": IVFDATA_FILE,
            "build": {"seconds": time.perf_counter() - t0, "copy_seconds": copy_s, "train_seconds": train_s,
                      "add_seconds": add_s, "merge_seconds": merge_s, "n_shards": n_shards, "workers": workers,
                      "threads_per_worker": max(1, threads // workers), "shards": shards,
                      "train_size": train_size, "threads": threads, "seed": cfg.seed,
                      "rss_delta_mib": _rss_mib() - rss0, "peak_rss_mib": _peak_rss_mib()},
            "search": {"param": search_knob(index), "value": get_search_param(index)},
        }
        if run_id is not None:
            meta["run_id"] = run_id  # the tracked run that built it (build_model_index)
        log.info("sharded build: %d items in %d shards, %.1f s (train %.1f, add %.1f, merge %.1f)", n, n_shards,
                 meta["build"]["seconds"], train_s, add_s, merge_s)
        item_index = ItemIndex(index, stored_items, vocab, meta)
        _measure(item_index, queries, cfg)
        faiss.write_index(index, str(stage / INDEX_FILE))  # the header again, with the tuned nprobe
        meta["index_sha256"] = sha256_file(stage / INDEX_FILE)
        meta["ivfdata_sha256"] = sha256_file(stage / IVFDATA_FILE)
        _record_size(meta, stage, index)
        (stage / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        del item_index, index, stored_items
    return load_index(out, verify=False)


# ---- the stage ------------------------------------------------------------------------------------------------
@dataclass
class IndexBuildResult:
    path: Path
    meta: dict
    run_id: str | None


def build_model_index(model: str | Path, out: str | Path, cfg: IndexConfig, tracker=None,
                      tracking_uri: str | None = None, cache_dir: str | Path | None = None,
                      parent_run_id: str | None = None, force: bool = False) -> IndexBuildResult:
    """Build, tune and save the index for a trained model (whatever `registry.resolve_model_dir` takes), and
    record the build (parameters, recall@10/@100, build time, memory and bytes per item, the tuning curve) as
    a tracked run, nested under `parent_run_id` when given (a flow's run). Above `cfg.auto_compressed_min_items`
    items (or with `cfg.shards` > 1) the index is built in shards (`build_sharded_index`)."""
    from recsys_pretrain.tracking import NullTracker  # loads mlflow: a build needs it, serving does not

    tracker = tracker or NullTracker()
    model_dir = resolve_model_dir(model, tracking_uri, cache_dir)
    check_output(out, inputs=[model_dir], force=force)  # before the build, not after it
    model_meta = json.loads((model_dir / "model.json").read_text())
    vocab = Vocab.load(model_dir / "vocab.json")
    items = np.load(model_dir / "item_embeddings.npy", mmap_mode="r")  # (n_items, d)
    n_shards = resolve_shards(cfg, len(items))
    users = np.load(model_dir / "user_embeddings.npy", mmap_mode="r")  # (n_users, d)
    rng = np.random.default_rng(cfg.seed)
    pick = np.sort(rng.choice(len(users), min(cfg.tune_queries, len(users)), replace=False))
    queries = np.asarray(users[pick], dtype=np.float32)  # real user queries, not random directions
    provenance = {"run_id": model_meta.get("run_id"), "model": model_meta.get("model"),
                  "dataset": model_meta.get("dataset"), "source": str(model)}
    tags = {"stage": "index", "model_run_id": provenance["run_id"] or "", "model_type": provenance["model"] or ""}
    factory = resolve_factory(cfg, len(items), dim=items.shape[1] + (cfg.mips == "l2"), compressed=n_shards > 0)
    with tracker.start_run(cfg.experiment, f"index-{factory}-{provenance['dataset']}",
                           tags=tags, parent_run_id=parent_run_id,
                           description="FAISS candidate index: recall against exact search on sampled user "
                                       "vectors, search parameter tuned") as run_id:
        if n_shards:
            index = build_sharded_index(model_dir / "item_embeddings.npy", vocab, cfg, out, n_shards=n_shards,
                                        queries=queries, model=provenance, force=force, run_id=run_id)
        else:
            index = build_index(np.array(items), vocab, cfg, queries=queries, model=provenance)
            index.meta["run_id"] = run_id
            index.save(out, force=force)
        meta = index.meta
        tracker.log_params({"index": cfg, "resolved_factory": meta["resolved_factory"], "n_items": meta["n_items"],
                            "dim": meta["dim"], "model_run_id": provenance["run_id"],
                            "refine_factor": meta.get("refine_factor"),
                            "n_shards": meta["build"].get("n_shards", 1)})
        for row in meta.get("tuning", []):  # the recall / latency curve, one step per knob value
            step = row.get("efSearch", row.get("nprobe"))
            tracker.log_metrics({f"tune/{k}": v for k, v in row.items() if k not in ("efSearch", "nprobe")},
                                step=int(step))
        final = {"build/seconds": meta["build"]["seconds"], "build/rss_delta_mib": meta["build"]["rss_delta_mib"],
                 "index/bytes": meta["index_bytes"]}
        final.update({f"index/{k}": v for k, v in meta["memory"].items() if v is not None})  # memory vs recall
        final.update({f"recall/{k}": v for k, v in meta["recall"].items()
                      if k.startswith("recall_at") or k.endswith("_ms")})
        final.update({f"recall/without_refine/{k}": v
                      for k, v in (meta["recall"].get("without_refine") or {}).items()})
        tracker.log_metrics(final, step=0)
        tracker.set_tags({"target_met": meta["recall"]["target_met"], "search_param": meta["search"]})
        tracker.log_dict(meta, "index.json")
        if meta.get("tuning"):
            import matplotlib.pyplot as plt  # heavy, and only a build with a tuning curve draws

            fig = recall_latency_plot(meta)
            tracker.log_figure(fig, "recall_vs_latency.png")
            plt.close(fig)
    return IndexBuildResult(path=Path(out), meta=meta, run_id=run_id)


def recall_latency_plot(meta: dict):
    """Recall@10 / @100 against single-query p50 latency along the tuning walk, the chosen setting marked."""
    import matplotlib  # heavy, and only a build with a tuning curve draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = meta["tuning"]
    knob = "efSearch" if "efSearch" in rows[0] else "nprobe"
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k in RECALL_KS:
        ax.plot([r["p50_ms"] for r in rows], [r[f"recall_at_{k}"] for r in rows], marker="o", label=f"recall@{k}")
    for r in rows:
        ax.annotate(f"{r[knob]}", (r["p50_ms"], r["recall_at_10"]), fontsize=7, textcoords="offset points",
                    xytext=(3, -9))
    chosen = next((r for r in rows if r[knob] == (meta.get("search") or {}).get("value")), None)
    if chosen is not None:
        ax.axvline(chosen["p50_ms"], color="grey", ls=":", label=f"chosen {knob}={chosen[knob]}")
    ax.axhline(meta.get("recall", {}).get("target", 0.95), color="red", ls="--", lw=0.8, label="target")
    ax.set_xlabel("single-query p50 latency (ms, one thread)")
    ax.set_ylabel("recall against exact search")
    ax.set_title(f"{meta['resolved_factory']}: recall vs latency ({meta['n_items']:,} items)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
