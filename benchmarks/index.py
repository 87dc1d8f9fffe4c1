"""Candidate index benchmark: Flat, HNSW and IVF over 1M item vectors x 64 dimensions on 2 cores.

For each variant: build time, index size, peak memory, recall@10 / recall@100 against exact search on
held-out user queries (the knob tuned on other queries, as `recsys-pretrain index` does), single-query
p50 / p99 latency on one faiss thread (how the service searches) and batch throughput on all cores.
Target: recall@10 >= 0.95 at p99 <= 2 ms for a single query.

The vectors have the structure of trained embeddings (clusters of uneven size in a low-rank subspace,
norms and a bias coordinate skewed by popularity, user queries drawn near popular clusters); isotropic
random vectors, the worst case and unlike real embeddings, are measured once as a side note.

    python benchmarks/index.py                 # the full run (tens of minutes on 2 cores: HNSW builds dominate)
    python benchmarks/index.py --quick         # 5k items, seconds: a smoke test of the script
    python benchmarks/index.py --variants flat,hnsw32-l2

Each variant runs in its own process (peak memory is per variant). Results: benchmarks/results/index.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, cluster_centres, run_child, write_results  # noqa: E402

# name -> (factory, mips, nlist-independent extra IndexConfig fields)
VARIANTS = {
    "flat": ("Flat", "ip", {}),
    "hnsw32-l2": ("HNSW32", "l2", {"ef_construction": 100}),
    "hnsw32-ip": ("HNSW32", "ip", {"ef_construction": 100}),
    "ivf-l2": ("IVF{nlist},Flat", "l2", {}),
    "ivf-ip": ("IVF{nlist},Flat", "ip", {}),
    "ivf-sq8-l2": ("IVF{nlist},SQ8", "l2", {}),
    "isotropic-hnsw32-l2": ("HNSW32", "l2", {"ef_construction": 100}),  # side note: random vectors
}
TARGET_RECALL, TARGET_P99_MS = 0.95, 2.0


# ---- data ------------------------------------------------------------------------------------------------
def structured(n: int, d: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Items (n, d) and user queries (n_queries, d) shaped like trained embeddings; the last coordinate is
    the item bias (log popularity) and a constant 1 in the queries, as in the model directory."""
    rng = np.random.default_rng(seed)
    centres, p = cluster_centres(rng, n, d)  # clusters in a low-rank subspace, uneven sizes
    n_clusters = len(centres)
    cluster = rng.choice(n_clusters, n, p=p)
    pop = rng.zipf(1.2, n).clip(max=100_000).astype(np.float64)  # per-item popularity, heavy-tailed
    items = np.empty((n, d), np.float32)
    for lo in range(0, n, 200_000):  # chunks keep the float64 temporaries small
        hi = min(n, lo + 200_000)
        x = centres[cluster[lo:hi]] + 0.5 * rng.standard_normal((hi - lo, d - 1)) / np.sqrt(d - 1) * 4
        x *= (1.0 + 0.15 * np.log(pop[lo:hi]))[:, None]  # popular items have longer vectors
        items[lo:hi, :-1] = x
        items[lo:hi, -1] = 0.3 * np.log(pop[lo:hi])
    qc = rng.choice(n_clusters, n_queries, p=p)  # users sit near popular clusters
    users = np.empty((n_queries, d), np.float32)
    users[:, :-1] = centres[qc] + 0.7 * rng.standard_normal((n_queries, d - 1)) / np.sqrt(d - 1) * 4
    users[:, -1] = 1.0
    return items, users


def isotropic(n: int, d: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d), dtype=np.float32), rng.standard_normal((n_queries, d), dtype=np.float32))


def dataset(kind: str, n: int, d: int, n_tune: int, n_test: int) -> Path:
    """Cached items, tune / test queries and the exact top-100 of the test queries (the ground truth)."""
    import faiss

    out = CACHE / "index" / f"{kind}-{n}x{d}-q{n_tune}+{n_test}"
    if (out / "truth.npy").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    items, users = (structured if kind == "structured" else isotropic)(n, d, n_tune + n_test)
    np.save(out / "items.npy", items)
    np.save(out / "tune.npy", users[:n_tune])
    np.save(out / "test.npy", users[n_tune:])
    flat = faiss.IndexFlatIP(d)
    flat.add(items)
    _, truth = flat.search(users[n_tune:], 100)
    np.save(out / "truth.npy", truth + 1)  # item indices are 1-based
    print(f"  data {kind} {n:,} x {d}: {time.perf_counter() - t0:.1f} s", flush=True)
    return out


# ---- one variant, in its own process ---------------------------------------------------------------------
def measure(spec_json: str) -> dict:
    """Build, tune (on the tune queries) and measure (on the held-out test queries) one variant."""
    import faiss
    import polars as pl

    from recsys_pretrain.config import IndexConfig
    from recsys_pretrain.index import build_index, recall_at, single_query_latency
    from recsys_pretrain.vocab import Vocab

    spec = json.loads(spec_json)
    data = Path(spec["data"])
    items = np.load(data / "items.npy")
    tune_q, test_q, truth = np.load(data / "tune.npy"), np.load(data / "test.npy"), np.load(data / "truth.npy")
    vocab = Vocab.from_ids(pl.Series([0], dtype=pl.Int64), pl.Series(np.arange(1, len(items) + 1), dtype=pl.Int64))
    cfg = IndexConfig(factory=spec["factory"], mips=spec["mips"], target_recall=TARGET_RECALL,
                      tune_queries=len(tune_q), tune_latency_queries=spec["latency_queries"],
                      threads=spec["threads"], **spec["extra"])
    index = build_index(items, vocab, cfg, queries=tune_q)
    meta = index.meta

    labels, _ = index.search(test_q, 100)
    recall = {f"recall_at_{k}": recall_at(labels, truth, k) for k in (10, 100)}
    latency = single_query_latency(index, test_q[: spec["latency_queries"]])
    raw = _raw_latency(index, test_q[: spec["latency_queries"]])
    faiss.omp_set_num_threads(spec["threads"])
    batch = test_q[: spec["batch_queries"]]
    t0 = time.perf_counter()
    index.search(batch, 10)
    batch_qps = len(batch) / (time.perf_counter() - t0)

    tmp = Path(spec["tmp"])
    faiss.write_index(index.index, str(tmp))  # the size on disk is the size in memory for these types
    size = tmp.stat().st_size
    tmp.unlink()
    return {"variant": spec["name"], "factory": meta["resolved_factory"], "mips": meta["mips"],
            "search": meta["search"], "build_seconds": meta["build"]["seconds"],
            "tune_seconds": meta.get("tune_seconds"), "index_mib": size / 2**20,
            "build_rss_delta_mib": meta["build"]["rss_delta_mib"], **recall, **latency,
            "raw_faiss_p50_ms": raw[0], "raw_faiss_p99_ms": raw[1], "batch_qps": batch_qps,
            "batch_threads": spec["threads"], "tuned_recall": meta.get("recall"), "tuning": meta.get("tuning", [])}


def _raw_latency(index, queries: np.ndarray) -> tuple[float, float]:
    """faiss alone, one query at a time on one thread: the floor under ItemIndex.search's own work."""
    import faiss

    q = index._queries(queries)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    times = []
    for row in q:
        t0 = time.perf_counter()
        index.index.search(row[None], 10)
        times.append(time.perf_counter() - t0)
    faiss.omp_set_num_threads(threads)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


# ---- report ------------------------------------------------------------------------------------------------
def markdown(rows: list[dict], args, n: int, d: int) -> str:
    lines = [
        f"# Candidate index: {n:,} items x {d} dimensions, {args.threads} cores",
        "",
        *(["**A `--quick` smoke run at toy size: not the benchmark's result; run without `--quick`.**", ""]
          if args.quick else []),
        f"Structured vectors (clusters in a rank-16 subspace, Zipf popularity in the norms and the bias "
        f"coordinate); {args.tune_queries:,} user queries tune efSearch / nprobe to recall >= {TARGET_RECALL} at "
        f"10 and 100 (serving over-fetches past 10), {args.test_queries:,} other queries measure. Recall is "
        f"against exact inner-product search. Single-query latency: one faiss thread, {args.latency_queries} "
        f"queries, through `ItemIndex.search` (FAISS plus exact re-scoring of the candidates); raw FAISS "
        f"beside it. Batch: {args.batch_queries:,} queries at once on {args.threads} threads, k = 10. "
        f"`l2` = max inner product reduced to L2 nearest neighbour by one extra coordinate.",
        "",
        "| variant | index | search | build s | index MiB | peak RSS MiB | recall@10 | recall@100 "
        "| p50 ms | p99 ms | raw FAISS p99 ms | batch q/s | target met |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        s = r["search"]
        knob = f"{s['param']}={s['value']}" if s and s.get("param") else "exact"
        met = r["recall_at_10"] >= TARGET_RECALL and r["p99_ms"] <= TARGET_P99_MS
        lines.append(
            f"| {r['variant']} | {r['factory']} ({r['mips']}) | {knob} | {r['build_seconds']:.1f} | "
            f"{r['index_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['recall_at_10']:.3f} | {r['recall_at_100']:.3f} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['raw_faiss_p99_ms']:.2f} | {r['batch_qps']:,.0f} | "
            f"{'yes' if met else '**no**'} |")
    lines += ["", "## Tuning curves (tune queries)", ""]
    for r in rows:
        if not r["tuning"]:
            continue
        knob = r["search"]["param"]
        lines.append(f"**{r['variant']}**: " + ", ".join(
            f"{knob} {t[knob]}: R@10 {t['recall_at_10']:.3f} / R@100 {t['recall_at_100']:.3f} / "
            f"p99 {t['p99_ms']:.2f} ms" for t in r["tuning"]))
        lines.append("")
    lines += ["## Against the target (recall@10 >= 0.95 at single-query p99 <= 2 ms)", "",
              "The table's settings are tuned for recall >= 0.95 at 10 *and* 100, what serving needs when it "
              "over-fetches past the seen items. The cheapest setting for recall@10 alone, from the tuning "
              "curve (tune queries):", ""]
    for r in rows:
        knob = (r["search"] or {}).get("param")
        first = next((t for t in r["tuning"] if t["recall_at_10"] >= TARGET_RECALL), None) if knob else None
        if first is not None:
            lines.append(f"- {r['variant']}: {knob} {first[knob]}, recall@10 {first['recall_at_10']:.3f}, "
                         f"recall@100 {first['recall_at_100']:.3f}, p99 {first['p99_ms']:.2f} ms")
        elif knob:
            lines.append(f"- {r['variant']}: recall@10 never reached {TARGET_RECALL} on the grid")
    lines.append("")
    main = [r for r in rows if not r["variant"].startswith("isotropic")]
    ok = [r["variant"] for r in main if r["recall_at_10"] >= TARGET_RECALL and r["p99_ms"] <= TARGET_P99_MS]
    short = [r for r in main if r["variant"] not in ok]
    lines.append(f"Met by: {', '.join(ok) if ok else 'none'}.")
    for r in short:
        why = []
        if r["recall_at_10"] < TARGET_RECALL:
            why.append(f"recall@10 {r['recall_at_10']:.3f}")
        if r["p99_ms"] > TARGET_P99_MS:
            why.append(f"p99 {r['p99_ms']:.2f} ms")
        lines.append(f"- {r['variant']} falls short: {', '.join(why)}.")
    iso = [r for r in rows if r["variant"].startswith("isotropic")]
    if iso:
        r = iso[0]
        lines += ["", f"Side note, isotropic random vectors (the worst case, unlike trained embeddings): "
                      f"{r['factory']} ({r['mips']}) tuned to {r['search']['param']}={r['search']['value']} "
                      f"reaches recall@10 {r['recall_at_10']:.3f} at p99 {r['p99_ms']:.2f} ms."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5k items, few queries: a smoke test in seconds")
    p.add_argument("--items", type=int)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--nlist", type=int, help="IVF lists (default 4 sqrt(n), rounded to a power of two)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--tune-queries", type=int)
    p.add_argument("--test-queries", type=int)
    p.add_argument("--latency-queries", type=int)
    p.add_argument("--batch-queries", type=int)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    quick = args.quick
    n = args.items or (5_000 if quick else 1_000_000)
    args.tune_queries = args.tune_queries or (200 if quick else 2000)
    args.test_queries = args.test_queries or (200 if quick else 1000)
    args.latency_queries = args.latency_queries or (50 if quick else 1000)
    args.batch_queries = min(args.batch_queries or 1000, args.test_queries)
    from recsys_pretrain.index import default_nlist

    nlist = args.nlist or default_nlist(n)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")

    rows = []
    for name in names:
        factory, mips, extra = VARIANTS[name]
        kind = "isotropic" if name.startswith("isotropic") else "structured"
        data = dataset(kind, n, args.dim, args.tune_queries, args.test_queries)
        spec = {"name": name, "data": str(data), "factory": factory.format(nlist=nlist), "mips": mips,
                "extra": {**extra, **({"ef_construction": 64} if quick and "ef_construction" in extra else {})},
                "latency_queries": args.latency_queries, "batch_queries": args.batch_queries,
                "threads": args.threads, "tmp": str(data / f"{name}.faiss.tmp")}
        t0 = time.perf_counter()
        code = "import sys; sys.path.insert(0, 'benchmarks'); import index as bench; result = bench.measure(sys.argv[1])"
        row = run_child(code, json.dumps(spec))
        rows.append(row)
        print(f"  {name}: {row['factory']} ({row['mips']}) {row['search']} build {row['build_seconds']:.1f} s, "
              f"R@10 {row['recall_at_10']:.3f} R@100 {row['recall_at_100']:.3f}, p50 {row['p50_ms']:.2f} ms "
              f"p99 {row['p99_ms']:.2f} ms, {row['batch_qps']:,.0f} q/s, peak {row['peak_rss_mib']:.0f} MiB "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    payload = {"quick": quick, "items": n, "dim": args.dim, "nlist": nlist, "threads": args.threads,
               "tune_queries": args.tune_queries, "test_queries": args.test_queries,
               "target": {"recall_at_10": TARGET_RECALL, "p99_ms": TARGET_P99_MS}, "variants": rows}
    write_results("index", payload, markdown(rows, args, n, args.dim))
    print("wrote benchmarks/results/index.{md,json}")


if __name__ == "__main__":
    main()
