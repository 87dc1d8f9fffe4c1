"""Warm start against a full retrain, on a log split into two "nights".

A generated log of 30 days: night 1 sees days 1-25, night 2 the whole log (5 more days of events, some new
users and items). Night 1 trains each model from scratch; night 2 trains it twice, from scratch and warm
(from night 1's weights, items and users carried by raw id, `pretrain.warm_epoch_share` of the epochs). Both
night-2 models are tested on night 2's leave-last-out split, full ranking.

    python benchmarks/warm_start.py                # about 10 minutes on 2 cores
    python benchmarks/warm_start.py --quick        # a smoke run

Results: benchmarks/results/warm_start.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, write_results  # noqa: E402

from recsys_pretrain.checkpoint import item_overlap  # noqa: E402
from recsys_pretrain.config import IngestConfig, PrepareConfig, load_config  # noqa: E402
from recsys_pretrain.data.ingest import ingest  # noqa: E402
from recsys_pretrain.data.prepare import prepare  # noqa: E402
from recsys_pretrain.data.synthetic import SynthConfig, write_synthetic  # noqa: E402
from recsys_pretrain.train.pretrain import pretrain  # noqa: E402
from recsys_pretrain.vocab import Vocab  # noqa: E402

# The model sizes of configs/default.yaml (what the nightly flow trains by default).
MODEL_OVERRIDES = {
    "mf": ["pretrain.mf.train.epochs=16", "pretrain.mf.train.eval_every=4"],
    "bert4rec": ["pretrain.bert4rec.dim=64", "pretrain.bert4rec.max_len=50", "pretrain.bert4rec.train.epochs=12",
                 "pretrain.bert4rec.train.eval_every=3"],
}


def nights(work: Path, synth: SynthConfig, night1_days: int) -> tuple[Path, Path]:
    raw = work / "raw" / "events.csv"
    if not raw.exists():
        write_synthetic(synth, raw)
    events = pl.read_csv(raw, infer_schema_length=10_000)
    ts = pl.col("timestamp").str.to_datetime(time_zone="UTC") if events["timestamp"].dtype == pl.String \
        else pl.from_epoch(pl.col("timestamp"), time_unit="s").dt.replace_time_zone("UTC")  # epoch seconds
    cutoff = events.select(ts.min()).item() + dt.timedelta(days=night1_days)
    n1 = work / "raw" / "night1.csv"
    night1 = events.filter(ts < cutoff)
    if not 0 < len(night1) < len(events):
        raise RuntimeError(f"night 1 has {len(night1)} of {len(events)} events: the split by time failed")
    night1.write_csv(n1)
    out = []
    for name, path in (("night1", n1), ("night2", raw)):
        ing, prep = work / name / "ingested", work / name / "prepared"
        ingest([path], ing, IngestConfig(id_type="int"))
        prepare(ing, prep, PrepareConfig())
        out.append(prep)
    return out[0], out[1]


def run(prep: Path, model: str, out: Path, quick: bool, init_from: Path | None = None) -> dict:
    over = [f"pretrain.model={model}", f"pretrain.{model}.train.progress=false", *MODEL_OVERRIDES[model]]
    if quick:
        over += [f"pretrain.{model}.train.epochs=4", f"pretrain.{model}.train.eval_every=1"]
    cfg = load_config(None, over).pretrain
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = pretrain(prep, cfg, out, init_from=init_from)
    return {"seconds": time.perf_counter() - t0, "train_seconds": res.fit.train_seconds,
            "epochs": res.fit.epochs_run, "test": res.test, "valid": res.valid,
            "warm_start": res.warm_start, "model_dir": str(res.model_dir)}


def markdown(res: dict) -> str:
    lines = ["# Warm start against a full retrain: a log split into two nights", "",
             f"Generated log, {res['synth']['n_users']:,} users x {res['synth']['n_items']:,} items over "
             f"{res['synth']['n_days']} days; night 1 = days 1-{res['night1_days']}, night 2 = all days. Night 2: "
             f"{res['night2']['users']:,} users / {res['night2']['items']:,} items; night 1's model knows "
             f"{res['item_overlap']:.1%} of night 2's items. Model sizes of configs/default.yaml; warm start "
             f"trains {res['warm_epoch_share']:.0%} of the epoch budget. Test: night 2's last item per user, "
             "full ranking, history excluded.", "",
             "| model | night 2 from scratch: train s | epochs | test NDCG@10 | HR@10 | warm start: train s | "
             "epochs | test NDCG@10 | HR@10 | time saved | NDCG@10 change |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model, r in res["models"].items():
        s, w = r["scratch"], r["warm"]
        lines.append(
            f"| {model} | {s['train_seconds']:.1f} | {s['epochs']} | {s['test']['ndcg_at_10']:.4f} | "
            f"{s['test']['hr_at_10']:.4f} | {w['train_seconds']:.1f} | {w['epochs']} | "
            f"{w['test']['ndcg_at_10']:.4f} | {w['test']['hr_at_10']:.4f} | "
            f"{1 - w['train_seconds'] / s['train_seconds']:.0%} | "
            f"{w['test']['ndcg_at_10'] / s['test']['ndcg_at_10'] - 1:+.1%} |")
    lines += ["", "Night 1 (from scratch) for reference: " + "; ".join(
        f"{m} {r['night1']['train_seconds']:.1f} s, test NDCG@10 {r['night1']['test']['ndcg_at_10']:.4f}"
        for m, r in res["models"].items()), ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", default="mf,bert4rec")
    args = p.parse_args()
    synth = SynthConfig(n_users=600, n_items=300, events_per_user=60, seed=3) if args.quick else \
        SynthConfig(n_users=6000, n_items=3000, events_per_user=80, seed=3)
    night1_days = 25
    work = CACHE / ("warm_start_quick" if args.quick else "warm_start")
    shutil.rmtree(work, ignore_errors=True)
    prep1, prep2 = nights(work, synth, night1_days)
    v2 = Vocab.load(prep2 / "vocab.json")
    res = {"quick": args.quick, "synth": synth.__dict__, "night1_days": night1_days,
           "night2": {"users": v2.n_users, "items": v2.n_items},
           "warm_epoch_share": load_config(None, []).pretrain.warm_epoch_share, "models": {}}
    for model in args.models.split(","):
        r1 = run(prep1, model, work / f"{model}-night1", args.quick)
        res["item_overlap"] = item_overlap(r1["model_dir"], v2)
        scratch = run(prep2, model, work / f"{model}-night2-scratch", args.quick)
        warm = run(prep2, model, work / f"{model}-night2-warm", args.quick, init_from=Path(r1["model_dir"]))
        res["models"][model] = {"night1": r1, "scratch": scratch, "warm": warm}
        print(f"{model}: scratch {scratch['train_seconds']:.1f} s NDCG {scratch['test']['ndcg_at_10']:.4f}; "
              f"warm {warm['train_seconds']:.1f} s NDCG {warm['test']['ndcg_at_10']:.4f}", flush=True)
    write_results("warm_start" + ("_quick" if args.quick else ""), res, markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
