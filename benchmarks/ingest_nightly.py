"""Nightly ingestion: incremental hive partitions against re-ingesting everything, one night at a time.

    python benchmarks/ingest_nightly.py                          # 10 days x 1M events (the default scale)
    python benchmarks/ingest_nightly.py --days 30 --per-day 5e6  # the issue's scale (hours on 2 cores)
    python benchmarks/ingest_nightly.py --days 20 --retention-days 7 --name ingest_nightly_retention

A generated log of `--days` days is split into one CSV a day; night n is given days 1..n. Each night runs
twice, each in its own process (its peak RSS is its own):
- incremental: `plan` -> `ingest_partition` of the new day only -> `update_vocab` -> `combine` (the window:
  every day, or the last `--retention-days`; cross-day dedupe, indices, sort) -> `prepare`;
- full: the monolithic `ingest` of the window's days -> `prepare`.
Also per night: the bare Polars floor on the new day (`pl.scan_csv(day).sink_parquet(...)`) beside
`ingest_partition` of that day, and after the last night one equality check of the two paths' events.
Results: benchmarks/results/ingest_nightly.md and .json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, rerender, run_child, write_results  # noqa: E402

SYNTH = """
from pathlib import Path
from recsys_pretrain.data.synthetic import SynthConfig, write_synthetic
from recsys_pretrain.data.partitions import split_by_day
days, per_day = int(sys.argv[2]), float(sys.argv[3])
n_users = int(days * per_day / 100)
write_synthetic(SynthConfig(n_users=n_users, n_items=max(1000, n_users // 5), events_per_user=100.0, n_days=days,
                            seed=0), Path(sys.argv[1]) / "log.csv")
files = split_by_day(Path(sys.argv[1]) / "log.csv", Path(sys.argv[1]) / "raw")
(Path(sys.argv[1]) / "log.csv").unlink()
result = {"files": files}
"""

INCREMENTAL = """
import json, time
from recsys_pretrain.config import IngestConfig, PrepareConfig
from recsys_pretrain.data import partitions as P
from recsys_pretrain.data.prepare import prepare
files, store, view, prepared = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
retention = None if sys.argv[5] == "all" else int(sys.argv[5])
cfg = IngestConfig(format="generic", id_type="int")
t = time.perf_counter()
todo = P.plan(files, store, cfg)
rows = 0
for day, fs in todo.items():
    rows += P.ingest_partition(day, fs, store, cfg)["report"]["rows_read"]
P.update_vocab(store, "int")
t_ingest = time.perf_counter() - t
t = time.perf_counter()
rep = P.combine(store, view, cfg, P.window(store, retention))
t_combine = time.perf_counter() - t
t = time.perf_counter()
m = prepare(view, prepared, PrepareConfig())
result = {"days_ingested": len(todo), "rows_ingested": rows, "ingest_s": t_ingest, "combine_s": t_combine,
          "prepare_s": time.perf_counter() - t, "rows_accepted": rep["rows_accepted"],
          "rows_read": rep["rows_read"], "interactions": m["interactions"]}
"""

FULL = """
import json, time
from recsys_pretrain.config import IngestConfig, PrepareConfig
from recsys_pretrain.data.ingest import ingest
from recsys_pretrain.data.prepare import prepare
files, out, prepared = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
t = time.perf_counter()
rep = ingest(files, out, IngestConfig(format="generic", id_type="int")).report
t_ingest = time.perf_counter() - t
t = time.perf_counter()
m = prepare(out, prepared, PrepareConfig())
result = {"ingest_s": t_ingest, "prepare_s": time.perf_counter() - t, "rows_accepted": rep["rows_accepted"],
          "rows_read": rep["rows_read"], "interactions": m["interactions"]}
"""

FLOOR = """
import polars as pl
t = time.perf_counter()
pl.scan_csv(sys.argv[1]).sink_parquet(sys.argv[2])
result = {"work_s": time.perf_counter() - t}
"""

ONE_DAY = """
from recsys_pretrain.config import IngestConfig
from recsys_pretrain.data import partitions as P
day = P.day_of(sys.argv[1])
t = time.perf_counter()
s = P.ingest_partition(day, [sys.argv[1]], sys.argv[2], IngestConfig(format="generic", id_type="int"))
result = {"rows_read": s["report"]["rows_read"], "work_s": time.perf_counter() - t}
"""

EQUAL = """
import polars as pl
from recsys_pretrain import schema as S
from recsys_pretrain.vocab import Vocab

def events(d):  # raw columns, users in raw id order (each path orders users by its own indices)
    return pl.read_parquet(d + "/events.parquet").select(S.CANONICAL_COLUMNS).sort(S.USER_ID, maintain_order=True)

def loo(d):  # the leave-last-out table in raw ids
    v, t = Vocab.load(d + "/vocab.json"), pl.read_parquet(d + "/loo.parquet")
    items = pl.concat([pl.Series([None], dtype=v.items.dtype), v.items])
    return pl.DataFrame({"user": v.users.gather(t[S.USER_IDX].cast(pl.Int64)),
                         "train": t["train"].list.eval(pl.element().cast(pl.Int64)).map_elements(
                             lambda xs: items.gather(xs).to_list(), return_dtype=pl.List(v.items.dtype)),
                         "valid": items.gather(t["valid"].cast(pl.Int64).fill_null(0)),
                         "test": items.gather(t["test"].cast(pl.Int64).fill_null(0))}).sort("user")

a, b = events(sys.argv[1]), events(sys.argv[2])
result = {"rows": a.height, "events_equal": a.equals(b), "loo_equal": loo(sys.argv[3]).equals(loo(sys.argv[4]))}
"""


def _remove(path: Path) -> None:
    """An output published by `atomic_dir` (a link to its version directory), or a plain directory."""
    if path.is_symlink():
        target = path.resolve()
        path.unlink()
        shutil.rmtree(target, ignore_errors=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--days", type=int, default=10)
    ap.add_argument("--per-day", type=float, default=1e6, help="events a day")
    ap.add_argument("--retention-days", type=int, default=None,
                    help="train on the last N days only (flow.retention_days); default: every day")
    ap.add_argument("--name", default="ingest_nightly")
    ap.add_argument("--render", action="store_true", help="rewrite NAME.md from NAME.json; run nothing")
    args = ap.parse_args()
    if args.render:
        rerender(args.name, "# Nightly ingestion", markdown)
        return
    keep = args.retention_days or args.days
    base = CACHE / f"nightly-{args.days}x{int(args.per_day)}"
    if not (base / "files.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        print(f"generating {args.days} days x {args.per_day:g} events under {base} ...", flush=True)
        files = run_child(SYNTH, str(base), str(args.days), str(args.per_day))["files"]
        (base / "files.json").write_text(json.dumps(files))
    files = json.loads((base / "files.json").read_text())
    work = base / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    nights = []
    for n in range(1, len(files) + 1):
        given = json.dumps(files[:n])
        inc = run_child(INCREMENTAL, given, str(work / "store"), str(work / f"view-{n}"), str(work / f"prep-inc-{n}"),
                        str(args.retention_days or "all"))
        full = run_child(FULL, json.dumps(files[max(0, n - keep):n]), str(work / f"full-{n}"),
                         str(work / f"prep-full-{n}"))
        floor = run_child(FLOOR, files[n - 1], str(work / "floor.parquet"))
        day = run_child(ONE_DAY, files[n - 1], str(work / "one-day-store"))
        shutil.rmtree(work / "one-day-store")
        if n < len(files):  # keep the last night's outputs for the equality check
            for d in (f"view-{n}", f"prep-inc-{n}", f"full-{n}", f"prep-full-{n}"):
                _remove(work / d)
        night = {"night": n, "rows_in_window": full["rows_read"], "incremental": inc, "full": full,
                 "new_day_rows": day["rows_read"], "floor_s": floor["work_s"], "one_day_ingest_s": day["work_s"],
                 "one_day_over_floor": day["work_s"] / floor["work_s"]}
        nights.append(night)
        print(f"night {n}: incremental {inc['seconds']:.1f} s ({inc['peak_rss_mib']:.0f} MiB), "
              f"full {full['seconds']:.1f} s ({full['peak_rss_mib']:.0f} MiB), "
              f"day/floor {night['one_day_over_floor']:.2f}x", flush=True)
    last = len(files)
    equal = run_child(EQUAL, str(work / f"view-{last}"), str(work / f"full-{last}"), str(work / f"prep-inc-{last}"),
                      str(work / f"prep-full-{last}"))
    shutil.rmtree(work, ignore_errors=True)
    ratios = sorted(n["one_day_over_floor"] for n in nights)
    res = {"days": len(files), "events_per_day": args.per_day, "retention_days": args.retention_days,
           "nights": nights, "equality": equal,
           "one_day_over_floor_median": ratios[len(ratios) // 2], "one_day_over_floor_best": ratios[0]}
    write_results(args.name, res, markdown(res))
    print(markdown(res))


def markdown(res: dict) -> str:
    rows = []
    for n in res["nights"]:
        inc, full = n["incremental"], n["full"]
        rows.append(f"| {n['night']} | {n.get('rows_in_window', n.get('rows_given')):,} | {inc['ingest_s']:.1f} "
                    f"| {inc['combine_s'] + inc['prepare_s']:.1f} | {inc['seconds']:.1f} | {inc['peak_rss_mib']:,.0f} "
                    f"| {full['ingest_s']:.1f} | {full['prepare_s']:.1f} | {full['seconds']:.1f} "
                    f"| {full['peak_rss_mib']:,.0f} | {n['one_day_over_floor']:.2f}x |")
    nights = res["nights"]
    inc_total = sum(n["incremental"]["seconds"] for n in nights)
    full_total = sum(n["full"]["seconds"] for n in nights)
    inc_ingest = sum(n["incremental"]["ingest_s"] for n in nights)
    inc_combine = sum(n["incremental"]["combine_s"] for n in nights)
    full_ingest = sum(n["full"]["ingest_s"] for n in nights)
    eq = res["equality"]
    w = res.get("retention_days")
    if w:
        window = (f"Night n is given days 1..n and trains on the last {w} (`flow.retention_days={w}`): incremental "
                  f"combines those days from the partitions; full re-ingests exactly those days.")
        full_nights = [n for n in nights if n["night"] >= w]
        first, last = full_nights[0], full_nights[-1]
        secs = [n["incremental"]["seconds"] for n in full_nights]
        peaks = [n["incremental"]["peak_rss_mib"] for n in full_nights]
        rows_ = [n["rows_in_window"] for n in full_nights]
        per_m = [n["incremental"]["seconds"] / (n["rows_in_window"] / 1e6) for n in full_nights]
        growth = (f"**Once the window is full (nights {w} to {last['night']}) the incremental night no longer grows "
                  f"with the history:** {min(secs):.1f} to {max(secs):.1f} s and {min(peaks):,.0f} to {max(peaks):,.0f} "
                  f"MiB peak while the history ingested grew {last['night'] / first['night']:.1f}x; what moves is the "
                  f"window's own size ({min(rows_) / 1e6:.1f}M to {max(rows_) / 1e6:.1f}M rows: the generated log is "
                  f"thinner at its ends), at {min(per_m):.2f} to {max(per_m):.2f} s per million window rows. The store "
                  "keeps every day, each ingested once; at this scale the incremental night costs about what "
                  "re-ingesting the window costs (ingest saved, combine spent), and its memory is bounded by the "
                  "window as the full path's is.")
    else:
        window = "Night n is given days 1..n and trains on all of them (no retention)."
        growth = ("Without retention the window is the whole history: the incremental night ingests the new day "
                  "only, but then combines the whole window, so its total and its peak memory grow with the "
                  "history as re-ingesting everything does. The saving is in ingest; `--retention-days` bounds "
                  "the rest (see `ingest_nightly_retention.md`).")
    return "\n".join([
        "# Nightly ingestion: incremental partitions vs re-ingesting everything",
        "",
        f"Scale: **{res['days']} days x {res['events_per_day']:,.0f} generated events a day** (the issue asks for 30 x "
        "5M; scaled to fit the 2-core machine's session). " + window + " Each cell is one process: wall time in "
        "seconds (s) and its peak RSS (MiB). Incremental ingests only the new day (`ingest_partition`, sequential "
        "here: a Dask fan-out on 2 cores would measure contention), then `combine` (the window: cross-day dedupe, "
        "indices, sort) and `prepare`; full re-ingests the window with the monolithic `ingest`, then `prepare`.",
        "",
        "| night | rows in window | inc. ingest s | inc. combine + prepare s | inc. total s | inc. peak MiB "
        "| full ingest s | full prepare s | full total s | full peak MiB | new day: ingest / floor |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Sum over the nights: incremental {inc_total:.0f} s, full {full_total:.0f} s "
        f"({full_total / inc_total:.2f}x). Ingest alone: incremental {inc_ingest:.0f} s (the new day only), full "
        f"{full_ingest:.0f} s ({full_ingest / inc_ingest:.1f}x); combine over the nights {inc_combine:.0f} s.",
        "",
        growth,
        "",
        f"Equality after the last night ({eq['rows']:,} events): events equal row for row "
        f"**{eq['events_equal']}** (raw columns, users in raw id order: the incremental path's append-only "
        f"indices order users by first night seen), leave-last-out table (in raw ids) equal **{eq['loo_equal']}**.",
        "",
        f"Ingest speed of one day (`ingest_partition`) against the bare Polars floor on the same CSV "
        f"(`pl.scan_csv(day).sink_parquet(...)`, each in its own process, timed after imports): median "
        f"**{res['one_day_over_floor_median']:.2f}x**, best {res['one_day_over_floor_best']:.2f}x "
        "(target <= 2x; `benchmarks/ingest.py` measured the monolithic ingest at 2.38x on 10M events).",
        "",
    ])


if __name__ == "__main__":
    main()
