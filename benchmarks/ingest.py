"""Ingestion benchmark: our ingest + prepare beside the I/O floor and a pandas version of the same steps.

    python benchmarks/ingest.py                # 10M-event side by side, 50M-event memory check, real logs
    python benchmarks/ingest.py --events 1e6 --big-events 0   # a quick run

Each measurement runs in its own process, so its peak RSS is its own. Results:
benchmarks/results/ingest.md and ingest.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, DATASETS, RESULTS, run_child, write_results  # noqa: E402

SYNTH = """
from pathlib import Path
from recsys_pretrain.data.synthetic import SynthConfig, write_synthetic
n_users = int(float(sys.argv[2]) / 100)
result = write_synthetic(SynthConfig(n_users=n_users, n_items=max(1000, n_users // 5), events_per_user=100.0,
                                     seed=0), Path(sys.argv[1]))
"""

FLOOR = """
import polars as pl
pl.scan_csv(sys.argv[1]).sink_parquet(sys.argv[2])
result = {}
"""

OURS_INGEST = """
from recsys_pretrain.config import IngestConfig
from recsys_pretrain.data.ingest import ingest
r = ingest([sys.argv[1]], sys.argv[2], IngestConfig(format="generic", id_type="int")).report
result = {k: r[k] for k in ("rows_read", "rows_accepted", "rows_quarantined", "rows_duplicate", "users", "items")}
"""

OURS_PREPARE = """
from recsys_pretrain.config import PrepareConfig
from recsys_pretrain.data.prepare import prepare
m = prepare(sys.argv[1], sys.argv[2], PrepareConfig())
result = {"interactions": m["interactions"], "nnz": m["matrix"]["nnz"]}
"""

# The same steps in pandas: read as text, validate, quarantine, dedupe, sort, index ids, then the
# leave-last-out split and the CSR matrix. No k-core, as in ours.
PANDAS = """
import numpy as np, pandas as pd, scipy.sparse as sp
from recsys_pretrain import schema as S
df = pd.read_csv(sys.argv[1], dtype=str, keep_default_na=False)
n_read = len(df)
user = pd.to_numeric(df.user_id.str.strip(), errors="coerce")
item = pd.to_numeric(df.item_id.str.strip(), errors="coerce")
ts = pd.to_numeric(df.timestamp.str.strip(), errors="coerce")
event = df.event_type.str.strip().str.lower().map(S.DEFAULT_EVENT_ALIASES)
value = pd.to_numeric(df.value.replace("", np.nan), errors="coerce")
ok = user.notna() & item.notna() & ts.between(631152000, 4102444800) & event.notna()
ok &= (df.value == "") | value.notna()
df[~ok].assign(reason="invalid").to_parquet(sys.argv[2] + ".quarantine.parquet")
ev = pd.DataFrame({"user_id": user[ok].astype("int64"), "item_id": item[ok].astype("int64"),
                   "timestamp": pd.to_datetime(ts[ok], unit="s", utc=True), "event_type": event[ok],
                   "session_id": df.session_id[ok], "category_id": df.category_id[ok], "value": value[ok]})
del df
n_ok = len(ev)
ev = ev.drop_duplicates(subset=["user_id", "item_id", "timestamp", "event_type"], keep="first")
ev = ev.sort_values(["user_id", "timestamp"], kind="stable")
users = np.sort(ev.user_id.unique()); items = np.sort(ev.item_id.unique())
ev["user_idx"] = np.searchsorted(users, ev.user_id.to_numpy()).astype("uint32")
ev["item_idx"] = (np.searchsorted(items, ev.item_id.to_numpy()) + 1).astype("uint32")
ev.to_parquet(sys.argv[2] + ".events.parquet")
inter = ev[ev.event_type.isin(["click", "add_to_cart", "favorite", "purchase", "rating"])].copy()
pos = inter.groupby("user_idx").cumcount().to_numpy()
n = inter.groupby("user_idx")["item_idx"].transform("size").to_numpy()
split = np.where((n >= 3) & (pos == n - 1), 2, np.where((n >= 3) & (pos == n - 2), 1, 0))
inter["split"] = split
seqs = inter.groupby("user_idx")["item_idx"].agg(list)
seqs.to_frame().to_parquet(sys.argv[2] + ".sequences.parquet")
train = inter[inter.split == 0]
w = train.event_type.map({"click": 1.0, "add_to_cart": 2.0, "favorite": 2.0, "purchase": 4.0}).to_numpy()
m = sp.coo_matrix((w, (train.user_idx.to_numpy(), train.item_idx.to_numpy())),
                  shape=(len(users), len(items) + 1)).tocsr()
result = {"rows_read": n_read, "rows_accepted": len(ev), "rows_duplicate": n_ok - len(ev), "nnz": int(m.nnz)}
"""

REAL = [
    ("ml-1m", "sasrec", DATASETS / "ml-1m" / "ml-1m_sasrec_style.txt"),
    ("ml-100k", "movielens", DATASETS / "ml-100k" / "u.data"),
    ("taobao-head", "taobao", DATASETS / "taobao-userbehavior-head" / "UserBehavior_head.csv"),
]
REAL_INGEST = """
import json
from recsys_pretrain.config import IngestConfig
from recsys_pretrain.data.ingest import ingest
r = ingest([sys.argv[1]], sys.argv[2], IngestConfig(format=sys.argv[3])).report
result = {k: v for k, v in r.items() if k != "config"}
"""


def synth_file(events: float) -> Path:
    path = CACHE / f"synth-{int(events)}.csv"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        print(f"generating {path} ...", flush=True)
        run_child(SYNTH, str(path), str(events))
    return path


def side_by_side(events: float, repeats: int) -> dict:
    src = synth_file(events)
    work = CACHE / "work"
    rows = {}
    for rep in range(repeats):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        print(f"[{rep + 1}/{repeats}] floor, ours, pandas on {src.name}", flush=True)
        floor = run_child(FLOOR, str(src), str(work / "floor.parquet"))
        ing = run_child(OURS_INGEST, str(src), str(work / "ingested"))
        prep = run_child(OURS_PREPARE, str(work / "ingested"), str(work / "prepared"))
        pdx = run_child(PANDAS, str(src), str(work / "pandas"))
        for name, r in (("floor", floor), ("ingest", ing), ("prepare", prep), ("pandas", pdx)):
            rows.setdefault(name, []).append(r)
    shutil.rmtree(work, ignore_errors=True)

    def best(name: str) -> dict:  # the fastest repeat: the least disturbed by other load
        return min(rows[name], key=lambda r: r["seconds"])

    n = best("ingest")["rows_read"]
    floor, ing, prep, pdx = best("floor"), best("ingest"), best("prepare"), best("pandas")
    ours_total = ing["seconds"] + prep["seconds"]
    return {
        "input": str(src.name),
        "input_bytes": src.stat().st_size,
        "events": n,
        "repeats": repeats,
        "floor": floor,
        "ingest": ing,
        "prepare": prep,
        "pandas": pdx,
        "all_repeats": rows,
        "ingest_events_per_s": n / ing["seconds"],
        "ingest_over_floor": ing["seconds"] / floor["seconds"],
        "ingest_prepare_seconds": ours_total,
        "ingest_prepare_events_per_s": n / ours_total,
        "pandas_over_ours": pdx["seconds"] / ours_total,
        "same_rows_as_pandas": pdx["rows_accepted"] == ing["rows_accepted"],
    }


def big_memory(events: float) -> dict:
    src = synth_file(events)
    work = CACHE / "work-big"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"50M-class memory check on {src.name}", flush=True)
    ing = run_child(OURS_INGEST, str(src), str(work / "ingested"))
    prep = run_child(OURS_PREPARE, str(work / "ingested"), str(work / "prepared"))
    shutil.rmtree(work, ignore_errors=True)
    return {"input": src.name, "input_bytes": src.stat().st_size, "ingest": ing, "prepare": prep,
            "peak_rss_gib": max(ing["peak_rss_mib"], prep["peak_rss_mib"]) / 1024}


def real_logs() -> dict:
    out = {}
    for name, fmt, path in REAL:
        if not path.exists():
            out[name] = {"skipped": f"{path} not found"}
            continue
        work = CACHE / f"real-{name}"
        out[name] = run_child(REAL_INGEST, str(path), str(work), fmt)
        out[name]["unaccounted"] = out[name]["rows_read"] - (
            out[name]["rows_accepted"] + out[name]["rows_quarantined"] + out[name]["rows_duplicate"]
        )
        shutil.rmtree(work, ignore_errors=True)
    return out


def markdown(res: dict) -> str:
    s = res["side_by_side"]
    f = lambda r: f"{r['seconds']:.2f} s | {s['events'] / r['seconds'] / 1e6:.2f} M/s | {r['peak_rss_mib']:,.0f} MiB"  # noqa: E731
    lines = [
        "# Ingestion benchmark",
        "",
        f"## {s['events']:,} synthetic events ({s['input_bytes'] / 2**20:,.0f} MiB CSV), best of {s['repeats']}",
        "",
        "| step | wall time | events/s | peak RSS |",
        "|---|---:|---:|---:|",
        f"| I/O floor: `pl.scan_csv(...).sink_parquet(...)` | {f(s['floor'])} |",
        f"| ours: `ingest` | {f(s['ingest'])} |",
        f"| ours: `prepare` | {f(s['prepare'])} |",
        f"| ours: `ingest` + `prepare` | {s['ingest_prepare_seconds']:.2f} s | "
        f"{s['ingest_prepare_events_per_s'] / 1e6:.2f} M/s | "
        f"{max(s['ingest']['peak_rss_mib'], s['prepare']['peak_rss_mib']):,.0f} MiB |",
        f"| pandas, the same steps | {f(s['pandas'])} |",
        "",
        f"- `ingest`: **{s['ingest_events_per_s'] / 1e6:.2f} M events/s** (target >= 1 M/s), "
        f"**{s['ingest_over_floor']:.2f}x the I/O floor** (target <= 2x).",
        f"- pandas takes {s['pandas_over_ours']:.1f}x as long as ours for ingest + prepare; "
        f"same accepted rows: {s['same_rows_as_pandas']}.",
        "",
    ]
    if res.get("big"):
        b = res["big"]
        lines += [
            f"## Memory at scale: {b['ingest']['rows_read']:,} events ({b['input_bytes'] / 2**30:.1f} GiB CSV)"
            + (f" (measured {b['carried_from']} with the same code path)" if b.get("carried_from") else ""),
            "",
            f"- `ingest`: {b['ingest']['seconds']:.1f} s, peak RSS {b['ingest']['peak_rss_mib'] / 1024:.2f} GiB; "
            f"`prepare`: {b['prepare']['seconds']:.1f} s, peak RSS {b['prepare']['peak_rss_mib'] / 1024:.2f} GiB "
            f"(target < 4 GiB: {'met' if b['peak_rss_gib'] < 4 else 'NOT met'}).",
            "",
        ]
    lines += ["## Real logs (read by path from ../shared/datasets)", "",
              "| log | format | rows read | accepted | quarantined | duplicate | unaccounted | users | items | seconds |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in res["real"].items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} |")
            continue
        lines.append(
            f"| {name} | {r['format']} | {r['rows_read']:,} | {r['rows_accepted']:,} | {r['rows_quarantined']:,} | "
            f"{r['rows_duplicate']:,} | {r['unaccounted']} | {r['users']:,} | {r['items']:,} | {r['seconds']:.2f} |"
        )
    lines += [""]
    for name, r in res["real"].items():
        if "skipped" not in r:
            lines += [f"### {name}", "", f"Quarantine by reason: {json.dumps(r['quarantine_by_reason'])}; "
                      f"events by type: {json.dumps(r['events_by_type'])}; "
                      f"events per user: {json.dumps({k: round(v, 1) for k, v in r['events_per_user'].items()})}; "
                      f"time {r['time_min']} .. {r['time_max']}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=float, default=10e6)
    ap.add_argument("--big-events", type=float, default=50e6, help="0 to skip the memory check")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    res = {"side_by_side": side_by_side(args.events, args.repeats)}
    if args.big_events:
        res["big"] = big_memory(args.big_events)
    elif (RESULTS / "ingest.json").exists():  # keep the last memory check, marked with its own date
        old = json.loads((RESULTS / "ingest.json").read_text())
        if "big" in old.get("results", old):
            res["big"] = {**old.get("results", old)["big"], "carried_from": old.get("date")}
    res["real"] = real_logs()
    write_results("ingest", res, markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
