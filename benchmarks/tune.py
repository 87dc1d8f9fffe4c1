"""Tuned vs defaults at the same minutes: does `recsys-pretrain tune` buy test NDCG@10 over the model's
default config, given the same wall-clock budget?

For each dataset: the defaults trained once with `train.max_minutes = M`, against `tune` with
`tune.minutes = M` (each trial capped at tune.trial_max_minutes, by default M / 4), the best trial chosen on
validation NDCG@10 and its model tested once. Leave-last-out, full ranking, history excluded; popularity
beside them for scale. Both runs are tracked in one MLflow store under benchmarks/.cache/tune/.

    python benchmarks/tune.py                                        # 30 minutes each, ML-100k and Toys
    python benchmarks/tune.py --minutes 60 --datasets ml-100k        # one dataset, longer
    python benchmarks/tune.py --minutes 1 --datasets ml-100k --name tune_smoke   # a smoke run

Datasets are read by path from ../shared/datasets and never copied; work files go to benchmarks/.cache/tune.
Results: benchmarks/results/NAME.{md,json} (NAME defaults to tune).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, DATASETS, RESULTS, write_results  # noqa: E402

from recsys_pretrain.config import IngestConfig, PrepareConfig, load_config  # noqa: E402
from recsys_pretrain.data.ingest import ingest  # noqa: E402
from recsys_pretrain.data.prepare import prepare  # noqa: E402
from recsys_pretrain.data.prepared import load_prepared  # noqa: E402
from recsys_pretrain.tracking import MLflowTracker, resolve_tracking_uri  # noqa: E402
from recsys_pretrain.train.pretrain import pretrain  # noqa: E402
from recsys_pretrain.tune import tune  # noqa: E402

WORK = CACHE / "tune"
SOURCES = {  # name -> (file, ingest format)
    "ml-100k": (DATASETS / "ml-100k" / "u.data", "movielens"),
    "amazon-toys": (DATASETS / "amazon-toys" / "Toys_and_Games_pairs.txt", "sasrec"),
}


def data_ready(name: str) -> Path:
    src, fmt = SOURCES[name]
    ing, prep = WORK / name / "ingested", WORK / name / "prepared"
    if (prep / "meta.json").exists():
        return prep
    t = time.perf_counter()
    r = ingest([src], ing, IngestConfig(format=fmt)).report
    prepare(ing, prep, PrepareConfig(first_only=True))  # as benchmarks/suite.py prepares
    print(f"{name}: {r['users']} users, {r['items']} items, {r['rows_accepted']:,} interactions "
          f"({time.perf_counter() - t:.1f}s)", flush=True)
    return prep


def run_defaults(prep: Path, model: str, minutes: float, tracker, overrides: list[str], name: str) -> dict:
    cfg = load_config(None, [f"pretrain.model={model}", f"pretrain.{model}.train.progress=false",
                             f"pretrain.{model}.train.max_minutes={minutes}", f"pretrain.experiment=bench-tune-{name}",
                             *overrides]).pretrain
    out = WORK / name / f"defaults-{model}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = pretrain(prep, cfg, out, tracker=tracker, run_name=f"defaults-{model}-{minutes:g}min")
    return {"config": dataclasses.asdict(getattr(cfg, model)), "valid": res.valid, "test": res.test,
            "popularity_test": res.popularity_test, "epochs": res.fit.epochs_run, "best_epoch": res.fit.best_epoch,
            "stopped": res.fit.stopped, "train_minutes": res.fit.train_seconds / 60,
            "wall_minutes": (time.perf_counter() - t0) / 60, "run_id": res.run_id}


def run_tune(prep: Path, model: str, minutes: float, tracker, overrides: list[str], name: str,
             trials: int | None) -> dict:
    cfg = load_config(None, [f"tune.model={model}", f"tune.minutes={minutes}", f"pretrain.model={model}",
                             f"pretrain.{model}.train.progress=false", f"pretrain.experiment=bench-tune-{name}",
                             *([f"tune.n_trials={trials}"] if trials else []), *overrides])
    out = WORK / name / f"tune-{model}"
    t0 = time.perf_counter()
    res = tune(prep, cfg, out, tracker=tracker)
    s = res.summary()
    return {"valid": res.valid, "test": res.test, "best_params": res.best_params, "best_trial": res.best_trial,
            "trials": s["trials"], "stopped": res.stopped, "wall_minutes": (time.perf_counter() - t0) / 60,
            "parent_run_id": res.parent_run_id, "best_yaml": str(res.best_yaml),
            "trial_values": [(t.number, t.state, t.value) for t in res.trials],
            "tune_config": dataclasses.asdict(cfg.tune)}


def markdown(res: dict) -> str:
    m = res["minutes"]
    lines = [f"# Tuned vs defaults at {m:g} minutes ({res['model']})", "",
             f"Defaults: the {res['model']} config of recsys_pretrain/config.py trained with max_minutes {m:g}. "
             f"Tuned: `tune` with minutes {m:g} (Optuna TPE, median pruning on validation NDCG@10, each trial capped "
             f"at trial_max_minutes), the best trial's model tested once. Leave-last-out, full ranking, history "
             "excluded; test NDCG@10 / HR@10 over all users with a test item.", "",
             "| dataset | users | items | popularity | defaults | tuned | Δ | defaults: epochs (stopped) | "
             "tuned: trials run / pruned | tuned wall min |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for name, r in res["datasets"].items():
        d, t = r["defaults"], r["tuned"]
        pop = d["popularity_test"]["ndcg_at_10"]
        lines.append(
            f"| {name} | {r['users']:,} | {r['items']:,} | {pop:.4f} | {d['test']['ndcg_at_10']:.4f} / "
            f"{d['test']['hr_at_10']:.4f} | {t['test']['ndcg_at_10']:.4f} / {t['test']['hr_at_10']:.4f} | "
            f"{t['test']['ndcg_at_10'] - d['test']['ndcg_at_10']:+.4f} | {d['epochs']} ({d['stopped']}) | "
            f"{t['trials']['run']} / {t['trials']['pruned']} | {t['wall_minutes']:.1f} |")
    lines += ["", "Cells: test NDCG@10 / HR@10. Validation NDCG@10 (what the search chose on): " + "; ".join(
        f"{n}: defaults {r['defaults']['valid']['ndcg_at_10']:.4f}, tuned {r['tuned']['valid']['ndcg_at_10']:.4f}"
        for n, r in res["datasets"].items()), "", "## Best parameters", ""]
    for name, r in res["datasets"].items():
        params = ", ".join(f"`{k}={v:.4g}`" if isinstance(v, float) else f"`{k}={v}`"
                           for k, v in r["tuned"]["best_params"].items())
        lines.append(f"- {name}: trial {r['tuned']['best_trial']}: {params}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="the budget of each side, per dataset")
    ap.add_argument("--datasets", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    ap.add_argument("--model", choices=["bert4rec", "mf"], default="bert4rec")
    ap.add_argument("--trials", type=int, help="cap the number of trials (default: the budget decides)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = PyTorch's default")
    ap.add_argument("--name", default="tune", help="results name (benchmarks/results/NAME.{md,json})")
    ap.add_argument("overrides", nargs="*", help="config overrides for both sides, e.g. tune.trial_max_minutes=5")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tracker = MLflowTracker(resolve_tracking_uri(None, WORK))
    res: dict = {"model": args.model, "minutes": args.minutes, "overrides": args.overrides, "datasets": {}}
    partial = RESULTS / f"{args.name}.partial.json"
    for name in args.datasets:
        prep = data_ready(name)
        data = load_prepared(prep)
        entry = {"users": data.n_users, "items": data.n_items, "source": str(SOURCES[name][0])}
        del data
        print(f"{name}: defaults, {args.minutes:g} min", flush=True)
        entry["defaults"] = run_defaults(prep, args.model, args.minutes, tracker, args.overrides, name)
        print(f"{name}: tune, {args.minutes:g} min", flush=True)
        entry["tuned"] = run_tune(prep, args.model, args.minutes, tracker, args.overrides, name, args.trials)
        res["datasets"][name] = entry
        RESULTS.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(res, indent=1, default=str))
    write_results(args.name, res, markdown(res))
    partial.unlink(missing_ok=True)
    print(markdown(res))


if __name__ == "__main__":
    main()
