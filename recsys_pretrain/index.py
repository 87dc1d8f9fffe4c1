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

Loading checks every one of those against the metadata and refuses a mismatch by name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
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


def resolve_factory(cfg: IndexConfig, n_items: int) -> str:
    """`auto`: exact Flat for small catalogues (single-query brute force stays under ~1 ms there), else
    `cfg.auto_factory`. Anything else is passed to faiss.index_factory as written, `{nlist}` replaced by
    `default_nlist(n_items)` (so "IVF{nlist},Flat" scales with the catalogue)."""
    factory = cfg.factory
    if factory.strip().lower() == "auto":
        factory = "Flat" if n_items <= cfg.auto_flat_max_items else cfg.auto_factory
    return factory.replace("{nlist}", str(default_nlist(n_items)))


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


def _mips_items(vectors: np.ndarray, mips: str) -> tuple[np.ndarray, float]:
    """Vectors as stored in the index. `l2`: the reduction of maximum inner product to nearest neighbour
    (Bachrach et al. 2014): x -> [x, sqrt(M^2 - |x|^2)], queries q -> [q, 0], so that
    |q' - x'|^2 = |q|^2 + M^2 - 2 q.x ranks exactly as -q.x while the index sees a true metric."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if mips == "ip":
        return x, 0.0
    norms2 = np.einsum("nd,nd->n", x, x, dtype=np.float64)  # (n,)
    m2 = float(norms2.max()) if len(norms2) else 0.0
    extra = np.sqrt(np.maximum(m2 - norms2, 0.0)).astype(np.float32)[:, None]  # (n, 1)
    return np.ascontiguousarray(np.hstack([x, extra])), float(np.sqrt(m2))


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

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)  # (b, d)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index {self.dim}")
        if self.mips == "l2":
            q = np.ascontiguousarray(np.hstack([q, np.zeros((len(q), 1), np.float32)]))  # (b, d + 1)
        return q

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(b, d) queries -> (labels (b, k) item indices, -1 where fewer were found; scores (b, k) the exact
        inner products, -inf where no item), best first.

        Scores are recomputed from the stored vectors and the row re-sorted: an approximate index's own
        distances (L2 after the reduction, quantised codes) are not the model's score."""
        k = int(min(k, self.n_items))
        q = self._queries(queries)
        _, labels = self.index.search(q, k)  # (b, k) int64
        return self.rescore(queries, labels)

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
            np.save(stage / VECTORS_FILE, np.ascontiguousarray(self.vectors, dtype=np.float32))
            self.vocab.save(stage / VOCAB_FILE)
            meta = dict(self.meta)
            meta["index_sha256"] = sha256_file(stage / INDEX_FILE)
            meta["index_bytes"] = (stage / INDEX_FILE).stat().st_size
            (stage / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        self.meta = meta
        return Path(path)


def load_index(path: str | Path, expect: dict | None = None, verify: bool = True, mmap: bool = True) -> ItemIndex:
    """Load an index directory, checking its files against index.json, and index.json against `expect`
    ({field: value}, e.g. the serving model's `embeddings_sha256`). Raises IndexMismatchError naming the
    field that disagrees."""
    path = Path(path)
    if not (path / META_FILE).exists():
        raise FileNotFoundError(f"{path}: not an index directory (no {META_FILE})")
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise IndexMismatchError(f"{path}: format_version {meta.get('format_version')!r}, this code reads "
                                 f"{FORMAT_VERSION}; rebuild the index")
    for name in (INDEX_FILE, VECTORS_FILE, VOCAB_FILE):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path}: {name} is missing")
    if verify:
        found = sha256_file(path / INDEX_FILE)
        if found != meta["index_sha256"]:
            raise IndexMismatchError(f"{path}: index_sha256 of {INDEX_FILE} is {found[:12]}..., index.json says "
                                     f"{meta['index_sha256'][:12]}...: the file was replaced or is corrupt")
    index = faiss.read_index(str(path / INDEX_FILE))
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
def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int, batch: int = 1024) -> np.ndarray:
    """(b, k) item indices (1-based) of the exact top-k inner products: the ground truth."""
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
    kmax = min(max(RECALL_KS), index.n_items)
    labels, _ = index.search(queries, kmax)
    return {f"recall_at_{k}": recall_at(labels, exact, min(k, kmax)) for k in RECALL_KS}


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
    if n != vocab.n_items:
        raise ValueError(f"{n} item vectors for a vocabulary of {vocab.n_items} items")
    if cfg.mips not in MIPS_MODES:
        raise ValueError(f"index.mips must be one of {MIPS_MODES}, got {cfg.mips!r}")
    if not 0 < cfg.target_recall <= 1:
        raise ValueError(f"index.target_recall must be in (0, 1], got {cfg.target_recall}")
    if not cfg.tune_ks or not set(cfg.tune_ks) <= set(RECALL_KS):
        raise ValueError(f"index.tune_ks must be a non-empty subset of {RECALL_KS}, got {cfg.tune_ks}")
    if cfg.threads > 0:
        faiss.omp_set_num_threads(cfg.threads)
    factory = resolve_factory(cfg, n)
    if factory.replace(" ", "").lower().startswith("idmap"):
        raise ValueError(f"index.factory {factory!r}: leave out IDMap, the id map is added here")
    exact = factory.replace(" ", "").lower() == "flat"
    mips = "ip" if exact else cfg.mips  # the reduction buys nothing for brute force
    stored, max_norm = _mips_items(vectors, mips)
    metric = faiss.METRIC_INNER_PRODUCT if mips == "ip" else faiss.METRIC_L2
    rss0 = _rss_mib()
    t0 = time.perf_counter()
    try:
        base = faiss.index_factory(stored.shape[1], factory, metric)
    except RuntimeError as exc:
        raise ValueError(f"index.factory {factory!r} is not a valid faiss.index_factory string: {exc}") from None
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
        "index_dim": int(stored.shape[1]),
        "n_items": n,
        "embeddings_sha256": sha256_array(vectors),
        "build": {"seconds": build_s, "rss_delta_mib": _rss_mib() - rss0,
                  "ef_construction": cfg.ef_construction if hasattr(inner, "hnsw") else None,
                  "train_size": train_size, "threads": faiss.omp_get_max_threads(), "seed": cfg.seed},
        "search": {"param": search_knob(index), "value": get_search_param(index)},
    }
    item_index = ItemIndex(index, vectors, vocab, meta)
    if queries is not None and len(queries):
        kmax = min(max(RECALL_KS), n)
        truth = exact_topk(vectors, queries, kmax)
        t1 = time.perf_counter()
        curve = tune(item_index, queries, truth, cfg) if not exact else []
        recall = measure_recall(item_index, queries, truth)
        latency = single_query_latency(item_index, queries[: cfg.tune_latency_queries])
        meta["tuning"] = curve
        meta["tune_seconds"] = time.perf_counter() - t1
        meta["recall"] = {**recall, "queries": int(len(queries)), "target": cfg.target_recall,
                          "target_ks": list(cfg.tune_ks), "target_met": _meets(recall, cfg), **latency}
    return item_index


def _rss_mib() -> float:
    return psutil.Process(os.getpid()).memory_info().rss / 2**20


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
    record the build (parameters, recall@10/@100, build time, memory, the tuning curve) as a tracked run,
    nested under `parent_run_id` when given (a flow's run)."""
    from recsys_pretrain.tracking import NullTracker  # loads mlflow: a build needs it, serving does not

    tracker = tracker or NullTracker()
    model_dir = resolve_model_dir(model, tracking_uri, cache_dir)
    check_output(out, inputs=[model_dir], force=force)  # before the build, not after it
    model_meta = json.loads((model_dir / "model.json").read_text())
    vocab = Vocab.load(model_dir / "vocab.json")
    items = np.load(model_dir / "item_embeddings.npy")  # (n_items, d)
    users = np.load(model_dir / "user_embeddings.npy", mmap_mode="r")  # (n_users, d)
    rng = np.random.default_rng(cfg.seed)
    pick = np.sort(rng.choice(len(users), min(cfg.tune_queries, len(users)), replace=False))
    queries = np.asarray(users[pick], dtype=np.float32)  # real user queries, not random directions
    provenance = {"run_id": model_meta.get("run_id"), "model": model_meta.get("model"),
                  "dataset": model_meta.get("dataset"), "source": str(model)}
    tags = {"stage": "index", "model_run_id": provenance["run_id"] or "", "model_type": provenance["model"] or ""}
    with tracker.start_run(cfg.experiment, f"index-{resolve_factory(cfg, len(items))}-{provenance['dataset']}",
                           tags=tags, parent_run_id=parent_run_id,
                           description="FAISS candidate index: recall against exact search on sampled user "
                                       "vectors, search parameter tuned") as run_id:
        index = build_index(items, vocab, cfg, queries=queries, model=provenance)
        index.meta["run_id"] = run_id
        index.save(out, force=force)
        meta = index.meta
        tracker.log_params({"index": cfg, "resolved_factory": meta["resolved_factory"], "n_items": meta["n_items"],
                            "dim": meta["dim"], "model_run_id": provenance["run_id"]})
        for row in meta.get("tuning", []):  # the recall / latency curve, one step per knob value
            step = row.get("efSearch", row.get("nprobe"))
            tracker.log_metrics({f"tune/{k}": v for k, v in row.items() if k not in ("efSearch", "nprobe")},
                                step=int(step))
        final = {"build/seconds": meta["build"]["seconds"], "build/rss_delta_mib": meta["build"]["rss_delta_mib"],
                 "index/bytes": meta["index_bytes"]}
        final.update({f"recall/{k}": v for k, v in meta["recall"].items()
                      if k.startswith("recall_at") or k.endswith("_ms")})
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
