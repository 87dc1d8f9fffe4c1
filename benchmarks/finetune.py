"""Label efficiency: what pretraining buys when fine-tuning on few click / purchase labels.

    python benchmarks/finetune.py            # synthetic log with impressions + the Taobao UserBehavior head
    python benchmarks/finetune.py --quick    # a small synthetic log, one seed

For each initialisation (pretrained frozen, pretrained fine-tuned, random) and a scikit-learn baseline on
the same features, at 1%, 5%, 25% and 100% of the fine-tuning labels, 3 seeds each: test AUC, log loss
and GAUC for clicks (pCTR) and purchases (pCTCVR). On the synthetic log also the oracle AUC of the
generator's true affinities. Pretraining uses only events before T1. Everything is logged to MLflow
(one run, every number a metric, the plot an artifact). Results: benchmarks/results/finetune.{md,json,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, DATASETS, RESULTS, write_results  # noqa: E402

from recsys_pretrain import schema as S  # noqa: E402
from recsys_pretrain.config import FinetuneConfig, IngestConfig, LabelConfig, load_config  # noqa: E402
from recsys_pretrain.data.ingest import ingest  # noqa: E402
from recsys_pretrain.data.labels import build_labels, features  # noqa: E402
from recsys_pretrain.data.synthetic import SynthConfig, true_affinity, write_synthetic  # noqa: E402
from recsys_pretrain.metrics import binary_metrics  # noqa: E402
from recsys_pretrain.tracking import MLflowTracker, resolve_tracking_uri  # noqa: E402
from recsys_pretrain.train.finetune import (  # noqa: E402
    INITS,
    finetune,
    load_label_data,
    pretrain_before_cutoff,
    split_finetune,
)
from recsys_pretrain.vocab import Vocab  # noqa: E402

FRACTIONS = (0.01, 0.05, 0.25, 1.0)
TASKS = {"click": "y_click", "purchase": "y_purchase"}


def sklearn_baseline(label_dir: Path, fraction: float, seed: int) -> dict:
    """HistGradientBoosting on the ranker's own side features, one model per task."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    labels, feats = load_label_data(label_dir)
    cfg = dataclasses.replace(load_config(None).finetune, label_fraction=fraction)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
    train, _ = split_finetune(labels, cfg, seed)
    test = labels.filter(pl.col("split") == "test")
    xtr, xte = features(train, feats), features(test, feats)
    out = {}
    for task, col in TASKS.items():
        y = train[col].to_numpy()
        if y.min() == y.max():  # one class only at this fraction: predict the rate
            p = np.full(test.height, float(y.mean()))
        else:
            p = HistGradientBoostingClassifier(max_iter=100, random_state=seed).fit(xtr, y).predict_proba(xte)[:, 1]
        for k, v in binary_metrics(test[col].to_numpy(), p, test[S.USER_IDX].to_numpy()).items():
            out[f"{task}_{k}"] = v
    return out


def oracle(label_dir: Path, ingested: Path, truth: Path) -> dict:
    labels, _ = load_label_data(label_dir)
    test = labels.filter(pl.col("split") == "test")
    vocab = Vocab.load(ingested / "vocab.json")
    aff = true_affinity(truth, np.asarray(vocab.user_ids(test[S.USER_IDX].to_numpy())),
                        np.asarray(vocab.item_ids(test[S.ITEM_IDX].to_numpy())))
    return {f"{t}_auc": binary_metrics(test[c].to_numpy(), 1 / (1 + np.exp(-aff)))["auc"] for t, c in TASKS.items()}


def grid(name: str, ingested: Path, work: Path, seeds: list[int], epochs: int, pretrain_overrides: list[str],
         truth: Path | None) -> dict:
    t0 = time.perf_counter()
    label_dir = work / "labels"
    report = build_labels(ingested, label_dir, LabelConfig())
    pcfg = load_config(None, ["pretrain.model=mf", f"pretrain.mf.loss={FinetuneConfig().pretrain_mf_loss}",
                              *pretrain_overrides]).pretrain
    pre = pretrain_before_cutoff(label_dir, pcfg, work / "pretrain")
    print(f"[{name}] labels {report['splits']}; pretrained mf before T1: test NDCG@10 "
          f"{pre.test['ndcg_at_10']:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    rows = []
    for fraction in FRACTIONS:
        for seed in seeds:
            for init in INITS:
                cfg = load_config(None, [f"finetune.init={init}", f"finetune.label_fraction={fraction}",
                                         f"finetune.train.seed={seed}", f"finetune.train.epochs={epochs}"]).finetune
                res = finetune(label_dir, pre.model_dir, cfg, work / "ft")
                rows.append({"init": init, "fraction": fraction, "seed": seed, "train_rows": res.train_rows,
                             "epochs": res.fit.epochs_run, **res.test})
            rows.append({"init": "sklearn_hgb", "fraction": fraction, "seed": seed,
                         **sklearn_baseline(label_dir, fraction, seed)})
        print(f"[{name}] fraction {fraction} done ({time.perf_counter() - t0:.0f}s)", flush=True)
    out = {"labels": report, "pretrain_test_ndcg_at_10": pre.test["ndcg_at_10"], "rows": rows,
           "seconds": time.perf_counter() - t0}
    if truth is not None:
        out["oracle"] = oracle(label_dir, ingested, truth)
    return out


def summarise(rows: list[dict]) -> dict:
    """Per (init, fraction): mean, std and a 95% t-interval over seeds of every metric."""
    df = pl.DataFrame(rows)
    metrics = [c for c in df.columns if c.startswith(("click_", "purchase_"))]
    t95 = {1: float("nan"), 2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}
    out = {}
    for (init, frac), g in df.group_by("init", "fraction", maintain_order=True):
        n = g.height
        out[f"{init}@{frac:g}"] = {
            m: {"mean": float(g[m].mean()), "std": float(g[m].std() or 0.0),
                "ci95": t95.get(n, 1.96) * float(g[m].std() or 0.0) / np.sqrt(n), "n": n}
            for m in metrics if g[m].null_count() < n
        }
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 4 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        summ = results[name]["summary"]
        for c, task in enumerate(TASKS):
            ax = axes[r][c]
            for init in (*INITS, "sklearn_hgb"):
                pts = [(f, summ[f"{init}@{f:g}"][f"{task}_auc"]) for f in FRACTIONS if f"{init}@{f:g}" in summ]
                ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=[p[1]["std"] for p in pts],
                            marker="o", capsize=3, label=init)
            if "oracle" in results[name]:
                ax.axhline(results[name]["oracle"][f"{task}_auc"], ls="--", color="grey", label="oracle")
            ax.set_xscale("log")
            ax.set_xlabel("share of fine-tuning labels")
            ax.set_ylabel(f"test {task} AUC")
            ax.set_title(f"{name}: {task}")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def markdown(results: dict) -> str:
    lines = ["# Fine-tuning: label efficiency of pretrained embeddings", "",
             "Pretraining (MF) sees only events before T1; fine-tuning labels come from [T1, T2), test labels from",
             "[T2, end). Mean +- std over seeds; `sklearn_hgb` is HistGradientBoosting on the same side features",
             "(item popularity, category match, user activity).", "", "![plot](finetune.png)", ""]
    for name, r in results.items():
        lab = r["labels"]
        lines += [f"## {name}", "", f"Labels: {lab['negatives']}; fine-tuning rows {lab['splits']['finetune']['rows']:,} "
                  f"(click rate {lab['splits']['finetune']['click_rate']:.3f}, purchase rate "
                  f"{lab['splits']['finetune']['purchase_rate']:.4f}); test rows {lab['splits']['test']['rows']:,}. "
                  f"Pretrained MF (before T1) NDCG@10 {r['pretrain_test_ndcg_at_10']:.4f}.", ""]
        if "oracle" in r:
            lines += [f"Oracle AUC (true affinities): click {r['oracle']['click_auc']:.4f}, "
                      f"purchase {r['oracle']['purchase_auc']:.4f}.", ""]
        lines += ["| init | labels | click AUC | click GAUC | click logloss | purchase AUC | purchase GAUC | purchase logloss |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for key, m in r["summary"].items():
            init, frac = key.split("@")

            def f(metric: str, m=m) -> str:
                if metric not in m:
                    return "-"
                return f"{m[metric]['mean']:.4f} +- {m[metric]['std']:.4f}"

            lines.append(f"| {init} | {float(frac):.0%} | {f('click_auc')} | {f('click_gauc')} | {f('click_logloss')} | "
                         f"{f('purchase_auc')} | {f('purchase_gauc')} | {f('purchase_logloss')} |")
        lines += [""]
        for task in TASKS:
            for frac in (0.01, 0.05):
                a = r["summary"].get(f"finetuned@{frac:g}", {}).get(f"{task}_auc")
                b = r["summary"].get(f"random@{frac:g}", {}).get(f"{task}_auc")
                if a and b:
                    gap = a["mean"] - b["mean"]
                    spread = a["std"] + b["std"]
                    verdict = "met" if gap >= 0.02 and gap > spread else "not met"
                    lines.append(f"- {task}, {frac:.0%} labels: fine-tuned minus random = {gap:+.4f} AUC "
                                 f"(seed spread {spread:.4f}); target +0.02 outside the spread: {verdict}.")
        lines += [""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--skip-taobao", action="store_true")
    args = ap.parse_args()
    seeds = list(range(1 if args.quick else args.seeds))
    work = CACHE / "finetune"
    shutil.rmtree(work, ignore_errors=True)
    results = {}

    synth = SynthConfig(n_users=600 if args.quick else 4000, n_items=300 if args.quick else 1500,
                        n_categories=20, events_per_user=80, seed=0)
    raw, truth = work / "synth" / "events.csv", work / "synth" / "truth.npz"
    write_synthetic(synth, raw, truth=truth)
    ingest([raw], work / "synth" / "ingested", IngestConfig(id_type="int"))
    results["synthetic"] = grid("synthetic", work / "synth" / "ingested", work / "synth", seeds, args.epochs,
                                ["pretrain.mf.train.epochs=16"], truth)
    taobao = DATASETS / "taobao-userbehavior-head" / "UserBehavior_head.csv"
    if not args.skip_taobao and not args.quick and taobao.exists():
        ingest([taobao], work / "taobao" / "ingested", IngestConfig(format="taobao"))
        results["taobao-head"] = grid("taobao-head", work / "taobao" / "ingested", work / "taobao", seeds,
                                      args.epochs, ["pretrain.mf.train.epochs=16"], None)
    for r in results.values():
        r["summary"] = summarise(r["rows"])
    plot(results, RESULTS / "finetune.png")

    tracker = MLflowTracker(resolve_tracking_uri(None, CACHE))
    with tracker.start_run("label-efficiency", "finetune-benchmark", tags={"stage": "benchmark"},
                           description="label efficiency of pretrained embeddings (benchmarks/finetune.py)"):
        for name, r in results.items():
            for row in r["rows"]:
                prefix = f"{name}/{row['init']}/f{row['fraction']:g}/seed{row['seed']}"
                tracker.log_metrics({f"{prefix}/{k}": v for k, v in row.items()
                                     if k.startswith(("click_", "purchase_", "cvr_")) and v == v}, step=0)
        tracker.log_artifact(RESULTS / "finetune.png")
        tracker.log_dict({k: {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in results.items()},
                         "finetune_summary.json")
    write_results("finetune", {"results": results, "fractions": FRACTIONS, "seeds": seeds}, markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
