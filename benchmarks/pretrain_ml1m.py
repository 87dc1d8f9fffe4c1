"""ML-1M pretraining benchmark: ours (mf, bert4rec) beside popularity, EASE and implicit's ALS and BPR,
with one protocol: leave-last-out, full ranking over all 3,416 items, the user's history excluded,
HR@10 and NDCG@10 over all 6,040 users, models chosen on validation.

    python benchmarks/pretrain_ml1m.py                      # the full run (about 105 minutes on 2 cores)
    python benchmarks/pretrain_ml1m.py --bert4rec-minutes 5 --skip rectools  # a quick look

Peers run in their own virtualenv, kept out of the main install: `python -m venv .venv-bench &&
.venv-bench/bin/pip install torch==2.13.0 "rectools[torch]==0.19.0"` (RecTools brings implicit's ALS and
BPR as pm-implicit). RecTools' BERT4Rec and SASRec train epoch by epoch under their own wall-clock budget
(`--rectools-minutes`) with validation after each epoch, in benchmarks/_rectools_peer.py. Results:
benchmarks/results/pretrain_ml1m.{md,json} and pretrain_ml1m_curve.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, DATASETS, RESULTS, ROOT, rerender, write_results  # noqa: E402

from recsys_pretrain.checkpoint import build_model  # noqa: E402
from recsys_pretrain.config import IngestConfig, PrepareConfig, load_config  # noqa: E402
from recsys_pretrain.data.ingest import ingest  # noqa: E402
from recsys_pretrain.data.prepare import prepare  # noqa: E402
from recsys_pretrain.data.prepared import history_matrix, load_prepared  # noqa: E402
from recsys_pretrain.evaluation import evaluate, evaluate_popularity  # noqa: E402
from recsys_pretrain.metrics import evaluate_scores  # noqa: E402
from recsys_pretrain.models.mf import MFConfig  # noqa: E402
from recsys_pretrain.train.pretrain import pretrain  # noqa: E402

SOURCE = DATASETS / "ml-1m" / "ml-1m_sasrec_style.txt"
WORK = CACHE / "ml-1m"
BENCH_PY = ROOT / ".venv-bench" / "bin" / "python"

IMPLICIT = """
import json, sys, time, numpy as np, scipy.sparse as sp
from threadpoolctl import threadpool_limits
import implicit
kind, matrix, out, seed = sys.argv[1:5]
X = sp.load_npz(matrix).tocsr()
with threadpool_limits(1, "blas"):  # implicit's advice: its own threads, single-threaded BLAS
    if kind == "als":
        m = implicit.cpu.als.AlternatingLeastSquares(factors=64, regularization=0.05, alpha=2.0, iterations=15,
                                                     random_state=int(seed))
    else:
        m = implicit.cpu.bpr.BayesianPersonalizedRanking(factors=64, learning_rate=0.01, regularization=0.01,
                                                         iterations=100, random_state=int(seed))
    t = time.perf_counter(); m.fit(X, show_progress=False); secs = time.perf_counter() - t
np.save(out + "_users.npy", m.user_factors); np.save(out + "_items.npy", m.item_factors)
print(json.dumps({"seconds": secs, "version": implicit.__version__}))
"""


def data_ready() -> Path:
    ing, prep = WORK / "ingested", WORK / "prepared"
    t = time.perf_counter()
    r = ingest([SOURCE], ing, IngestConfig(format="sasrec")).report
    prepare(ing, prep, PrepareConfig())
    assert (r["users"], r["items"], r["rows_accepted"]) == (6040, 3416, 999_611), r
    print(f"data: {r['users']} users, {r['items']} items, {r['rows_accepted']:,} interactions "
          f"({time.perf_counter() - t:.1f}s)", flush=True)
    return prep


def binary(data) -> sp.csr_matrix:
    m = data.train_matrix[:, 1:].tocsr().astype(np.float32)  # drop the padding column
    m.data[:] = 1.0
    return m


def eval_factors(data, users: np.ndarray, items: np.ndarray, stage: str) -> dict:
    U, V = torch.from_numpy(users).float(), torch.from_numpy(items).float()
    t = data.targets(stage)
    idx = np.flatnonzero(t >= 0)
    return evaluate_scores(lambda u: U[torch.from_numpy(u)] @ V.T, idx, t[idx],
                           history_matrix(data.histories(stage), data.n_items), data.n_items)


SEEDS = (0, 1, 2)  # the fast models run once per seed; the table gives the mean and the spread


def over_seeds(runs: list[dict]) -> dict:
    """The first seed's run, with test metrics and fit time averaged over all of them (and their std)."""
    out = dict(runs[0])
    failed = [i for i, r in enumerate(runs) if "test" not in r]
    if failed:
        out.pop("test", None)  # shown as failed, not as one seed's figures
        return {**out, "failed": f"seeds {[SEEDS[i] for i in failed]} failed"}
    out["test"] = {k: float(np.mean([r["test"][k] for r in runs])) for k in runs[0]["test"]}
    out["test_std"] = {k: float(np.std([r["test"][k] for r in runs])) for k in runs[0]["test"]}
    out["fit_seconds"] = float(np.mean([r["fit_seconds"] for r in runs]))
    out["seeds"] = [{"test_ndcg_at_10": r["test"]["ndcg_at_10"], "fit_seconds": r["fit_seconds"]} for r in runs]
    return out


def run_implicit(kind: str, data, seed: int = 0) -> dict:
    if not BENCH_PY.exists():
        return {"skipped": f"{BENCH_PY} missing: python -m venv .venv-bench && .venv-bench/bin/pip install implicit"}
    path = WORK / "train_binary.npz"
    sp.save_npz(path, binary(data))
    out = subprocess.run([str(BENCH_PY), "-c", IMPLICIT, kind, str(path), str(WORK / kind), str(seed)],
                         capture_output=True, text=True)
    if out.returncode:
        return {"failed": out.stderr[-2000:]}
    info = json.loads(out.stdout.strip().splitlines()[-1])
    users, items = np.load(WORK / f"{kind}_users.npy"), np.load(WORK / f"{kind}_items.npy")
    return {"fit_seconds": info["seconds"], "version": info["version"],
            "valid": eval_factors(data, users, items, "valid"), "test": eval_factors(data, users, items, "test")}


def run_rectools(kind: str, data, minutes: float) -> dict:
    """RecTools' BERT4Rec or SASRec on this benchmark's split, in .venv-bench (benchmarks/_rectools_peer.py)."""
    if not BENCH_PY.exists():
        return {"skipped": f"{BENCH_PY} missing: see this script's docstring"}
    split = WORK / "split_rectools.npz"
    if not split.exists():
        train, hist = data.histories("valid"), data.histories("test")
        np.savez(split, train_items=np.concatenate(train), train_offsets=np.cumsum([0] + [len(s) for s in train]),
                 test_hist_items=np.concatenate(hist), test_hist_offsets=np.cumsum([0] + [len(s) for s in hist]),
                 valid=data.targets("valid"), test=data.targets("test"))
    out = WORK / f"rectools_{kind}.json"
    out.unlink(missing_ok=True)
    log = WORK / f"rectools_{kind}.log"
    with open(log, "w") as f:
        code = subprocess.run([str(BENCH_PY), str(ROOT / "benchmarks" / "_rectools_peer.py"), kind, str(split),
                               str(out), str(minutes)], stdout=f, stderr=subprocess.STDOUT).returncode
    if code or not out.exists():
        return {"failed": log.read_text()[-2000:]}
    r = json.loads(out.read_text())
    r["curve_minutes_val_ndcg"] = [(c["elapsed_s"] / 60, c["val_ndcg_at_10"]) for c in r["curve"]]
    return r


def run_ease(data) -> dict:
    """EASE (Steck 2019): a closed-form item-item model; lambda chosen on validation."""
    X = binary(data)
    best = None
    t0 = time.perf_counter()
    G = (X.T @ X).toarray().astype(np.float64)
    for lam in (100.0, 300.0, 1000.0):
        P = np.linalg.inv(G + lam * np.eye(G.shape[0]))
        B = -P / np.diag(P)
        np.fill_diagonal(B, 0.0)
        Bt = torch.from_numpy(B).float()
        res = {}
        for stage in ("valid", "test"):
            hist = history_matrix(data.histories(stage), data.n_items)
            H = hist[:, 1:].tocsr()
            t = data.targets(stage)
            idx = np.flatnonzero(t >= 0)
            res[stage] = evaluate_scores(lambda u, H=H, Bt=Bt: torch.from_numpy(H[u].toarray()) @ Bt, idx, t[idx],
                                         hist, data.n_items)
        if best is None or res["valid"]["ndcg_at_10"] > best["valid"]["ndcg_at_10"]:
            best = {"lambda": lam, **res}
    best["fit_seconds"] = (time.perf_counter() - t0) / 3  # one fit (of the three lambdas)
    return best


def run_ours(prep: Path, model: str, overrides: list[str], minutes: float | None, tag: str = "") -> dict:
    cfg = load_config(None, [f"pretrain.{model}.{o}" for o in overrides] +
                      [f"pretrain.model={model}", f"pretrain.{model}.train.progress=false"]).pretrain
    if minutes is not None:
        mcfg = getattr(cfg, model)
        cfg = dataclasses.replace(cfg, **{model: dataclasses.replace(
            mcfg, train=dataclasses.replace(mcfg.train, max_minutes=minutes))})
    out = WORK / f"run-{model}{tag}"
    shutil.rmtree(out, ignore_errors=True)
    marks: dict = {}

    def snapshot(epoch: int, row: dict) -> None:
        # Keep the best-on-validation weights as they stood at each mark, to test them afterwards.
        for m in (12.0, 30.0):
            if minutes and m >= minutes:
                continue
            if row["elapsed_s"] >= m * 60 and m not in marks and (out / "checkpoints" / "best.pt").exists():
                shutil.copy(out / "checkpoints" / "best.pt", out / f"best_at_{m:.0f}min.pt")
                marks[m] = {"epoch": epoch, "elapsed_min": row["elapsed_s"] / 60}

    res = pretrain(prep, cfg, out, run_name=f"bench-{model}", on_epoch=snapshot)
    data = load_prepared(prep)
    for m, info in marks.items():
        ckpt = torch.load(out / f"best_at_{m:.0f}min.pt", weights_only=True)
        net = build_model(model, getattr(cfg, model), data.n_users, data.n_items)
        net.load_state_dict(ckpt["model"])
        info.update(best_epoch=ckpt["epoch"], val=ckpt["metrics"]["ndcg_at_10"],
                    test=evaluate(net, data, "test")["ndcg_at_10"])
    hist = res.fit.history
    curve = [(h["elapsed_s"] / 60, h["val_ndcg_at_10"]) for h in hist if "val_ndcg_at_10" in h]
    return {"config": dataclasses.asdict(getattr(cfg, model)), "fit_seconds": res.fit.train_seconds,
            "epochs": res.fit.epochs_run, "best_epoch": res.fit.best_epoch, "stopped": res.fit.stopped,
            "valid": res.valid, "test": res.test, "curve_minutes_val_ndcg": curve,
            "marks": {f"{m:.0f} min": v for m, v in marks.items()}}


def bert4rec_label(minutes: float) -> str:
    return f"ours: bert4rec, {minutes:g}-min budget"


def plot(curves: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for name, curve in curves.items():
        ax.plot([c[0] for c in curve], [c[1] for c in curve], marker="o", ms=3, label=f"{name} (validation)")
    ax.axhline(0.154, ls="--", color="grey", label="published BERT4Rec test NDCG@10 (GPU)")
    ax.set_xlabel("training wall-clock minutes (2 CPU cores)")
    ax.set_ylabel("NDCG@10, full ranking")
    ax.set_title("ML-1M: validation NDCG@10 against time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def at_minute(curve: list, minute: float) -> float | None:
    """Best validation NDCG@10 reached by `minute` (None if no evaluation by then)."""
    seen = [v for m, v in curve if m <= minute]
    return max(seen) if seen else None


def markdown(res: dict) -> str:
    rows = []
    for name, r in res["models"].items():
        if "test" not in r:
            rows.append(f"| {name} | - | - | - | {r.get('skipped') or 'failed'} |")
            continue
        t, sd = r["test"], r.get("test_std")
        secs = r.get("fit_seconds")
        n_seeds = len(r.get("seeds", []))

        def pm(k: str, sd=sd, n_seeds=n_seeds) -> str:
            return f" ± {sd[k]:.4f}" if sd and n_seeds > 1 else ""

        note = r.get("note", "") + (f"{'; ' if r.get('note') else ''}mean ± std over {n_seeds} seeds"
                                    if n_seeds > 1 else "")
        rows.append(f"| {name} | {t['hr_at_10']:.4f}{pm('hr_at_10')} | {t['ndcg_at_10']:.4f}{pm('ndcg_at_10')} | "
                    f"{'-' if secs is None else f'{secs:,.1f} s'} | {note} |")
    ours = [r for n, r in res["models"].items() if n.startswith("ours: bert4rec")]
    b = max(ours, key=lambda r: r.get("budget_minutes", 0), default={})  # the longest run's curve
    lines = [
        "# ML-1M pretraining: full-ranking leave-last-out, side by side",
        "",
        "6,040 users, 3,416 items, 999,611 interactions (ingested and prepared by this project). Test = each",
        "user's last item, validation = the one before; every one of the 3,416 items is ranked, the user's",
        "history is excluded, metrics over all 6,040 users. Models chosen on validation.",
        "",
        "| model | test HR@10 | test NDCG@10 | training wall time | note |",
        "|---|---:|---:|---:|---|",
        *rows,
        "",
    ]
    if "curve_minutes_val_ndcg" in b:
        run = f" ({b['budget_minutes']:g}-min run)" if b.get("budget_minutes") else ""
        lines += [f"## BERT4Rec: validation NDCG@10 against wall-clock minutes{run}", "",
                  f"![curve]({res.get('name', 'pretrain_ml1m')}_curve.png)", "",
                  "| minutes | " + " | ".join(f"{m:.1f}" for m, _ in b["curve_minutes_val_ndcg"]) + " |",
                  "|---|" + "---:|" * len(b["curve_minutes_val_ndcg"]),
                  "| val NDCG@10 | " + " | ".join(f"{v:.4f}" for _, v in b["curve_minutes_val_ndcg"]) + " |", ""]
        for m, info in b.get("marks", {}).items():
            lines.append(f"- At {m} (the first epoch to end past it, at {info['elapsed_min']:.1f} min): the "
                         f"best-on-validation model so far (epoch {info['best_epoch']}) has "
                         f"validation NDCG@10 {info['val']:.4f} and **test NDCG@10 {info['test']:.4f}**.")
        lines.append("")
    curves = {n: r["curve_minutes_val_ndcg"] for n, r in res["models"].items()
              if r.get("curve_minutes_val_ndcg") and r["curve_minutes_val_ndcg"][-1][0] >= 1.0}  # the Transformers
    if len(curves) > 1:
        marks = [m for m in (5, 10, 12, 15, 20, 30, 45, 60) if any(c and c[-1][0] >= m * 0.98 for c in curves.values())]
        lines += ["## Transformers at equal wall-clock minutes (best validation NDCG@10 so far)", "",
                  "| model | " + " | ".join(f"{m} min" for m in marks) + " | s / epoch |",
                  "|---|" + "---:|" * (len(marks) + 1)]
        for n, c in curves.items():
            r = res["models"][n]
            per_epoch = r.get("fit_seconds", 0) / max(r.get("epochs") or 1, 1)
            cells = [at_minute(c, m) if c[-1][0] >= m * 0.98 else None for m in marks]
            lines.append(f"| {n} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in cells)
                         + f" | {per_epoch:.0f} |")
        lines.append("")
    if not any(n.startswith("RecTools") for n in res["models"]):
        lines += ["RecTools' BERT4Rec and SASRec were not run in this run (`--skip rectools`); the side-by-side at an",
                  "equal budget is in pretrain_ml1m_equal_budget.md.", ""]
    lines += targets(res) + res.get("notes", [])
    return "\n".join(lines)


def targets(res: dict) -> list[str]:
    """The pretraining targets, each checked against this run's figures."""
    m, out = res["models"], []

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**falls short**"

    for name, r in m.items():
        if not name.startswith("ours: bert4rec") or "test" not in r:
            continue
        t, minutes = r["test"], r.get("budget_minutes")
        if minutes and minutes >= 60:
            out.append(f"- bert4rec within 60 minutes, test NDCG@10 >= 0.165 and HR@10 >= 0.29: {t['ndcg_at_10']:.4f} / "
                       f"{t['hr_at_10']:.4f}, {verdict(t['ndcg_at_10'] >= 0.165 and t['hr_at_10'] >= 0.29)}; the "
                       f"goal beyond, >= 0.18: {verdict(t['ndcg_at_10'] >= 0.18)}.")
        if minutes and minutes <= 12:
            out.append(f"- bert4rec NDCG@10 0.15 within 12 minutes: test {t['ndcg_at_10']:.4f} with a {minutes:g}-min "
                       f"budget, {verdict(t['ndcg_at_10'] >= 0.15)}.")
        mark = r.get("marks", {}).get("12 min")
        if mark:
            out.append(f"- bert4rec NDCG@10 0.15 within 12 minutes, from the {minutes:g}-min run: its best-on-validation "
                       f"model at {mark['elapsed_min']:.1f} min has test {mark['test']:.4f}, {verdict(mark['test'] >= 0.15)}.")
    als, mf = m.get("implicit ALS", {}), m.get("ours: mf", {})
    if "test" in als and "test" in mf:
        q, ratio = mf["test"]["ndcg_at_10"], mf["fit_seconds"] / als["fit_seconds"]
        out.append(f"- mf test NDCG@10 >= implicit ALS's at <= 2x its fit time: {q:.4f} vs {als['test']['ndcg_at_10']:.4f}, "
                   f"{ratio:.1f}x the time; quality {verdict(q >= als['test']['ndcg_at_10'])}, "
                   f"time {verdict(ratio <= 2.0)}.")
    return ["## Targets", "", *out, ""] if out else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bert4rec-minutes", type=float, nargs="+", default=[12.0, 60.0],
                    help="one training per budget; the learning-rate schedule fits each budget")
    ap.add_argument("--bert4rec", nargs="*", default=[],
                    help="overrides, e.g. dim=64 train.lr=0.001 (after train.epochs=1000 "
                         "train.budget_horizon=true: the budget ends training and the schedule fits it)")
    ap.add_argument("--rectools-minutes", type=float, default=15.0, help="budget of each RecTools Transformer")
    ap.add_argument("--skip", nargs="*", default=[], help="any of: peers mf bert4rec rectools")
    ap.add_argument("--name", default="pretrain_ml1m", help="results name (benchmarks/results/NAME.{md,json})")
    ap.add_argument("--render", action="store_true", help="rewrite NAME.md from NAME.json; train nothing")
    args = ap.parse_args()
    if args.render:
        rerender(args.name, "# ML-1M pretraining", markdown)
        return
    torch.set_num_threads(2)
    prep = data_ready()
    data = load_prepared(prep)
    res: dict = {"models": {}, "notes": []}
    partial = RESULTS / f"{args.name}.partial.json"

    def save() -> None:
        partial.write_text(json.dumps(res, indent=1, default=str))

    res["models"]["popularity"] = {"test": evaluate_popularity(data, "test"), "fit_seconds": 0.0}
    if "peers" not in args.skip:
        res["models"]["EASE"] = run_ease(data)
        res["models"]["EASE"]["note"] = f"lambda {res['models']['EASE']['lambda']:.0f} (on validation)"
        for kind in ("als", "bpr"):
            seeds = SEEDS if kind == "als" else SEEDS[:1]
            res["models"][f"implicit {kind.upper()}"] = over_seeds([run_implicit(kind, data, s) for s in seeds])
            save()
    if "mf" not in args.skip:
        default = MFConfig().loss
        for loss in (default, *(x for x in ("svd", "softmax") if x != default)):
            r = over_seeds([run_ours(prep, "mf", [f"loss={loss}", f"train.seed={s}"], None) for s in SEEDS])
            r["note"] = (f"{loss}, {r['config']['dim']} d" +
                         ("" if loss == "svd" else f", {r['epochs']} epochs") + ("" if loss != default else "; the default"))
            res["models"]["ours: mf" if loss == default else f"ours: mf ({loss})"] = r
            save()
    if "rectools" not in args.skip:
        for kind, label in (("bert4rec", "RecTools BERT4Rec"), ("sasrec", "RecTools SASRec")):
            r = run_rectools(kind, data, args.rectools_minutes)
            if "test" in r:
                c = r["config"]
                r["note"] = (f"{c['n_factors']} d, {c['n_blocks']} blocks, length {c['session_max_len']}, their "
                             f"defaults otherwise; {r['epochs']} epochs in the {args.rectools_minutes:.0f}-min budget, "
                             f"best epoch {r['best_epoch']}; RecTools {r['version']}")
            res["models"][label] = r
            save()
    for minutes in ([] if "bert4rec" in args.skip else args.bert4rec_minutes):
        r = run_ours(prep, "bert4rec", ["train.epochs=1000", "train.budget_horizon=true", *args.bert4rec], minutes,
                     tag=f"-{minutes:g}min")
        c = r["config"]
        r["budget_minutes"] = minutes
        r["note"] = (f"{c['dim']} d, {c['n_layers']} layers, length {c['max_len']}, mask {c['mask_prob']}, "
                     f"last-item {c['last_item_prob']}, lr {c['train']['lr']}, batch {c['train']['batch_size']}"
                     f"{', token-weighted loss' if c.get('token_weighted') else ''}; {r['epochs']} epochs, best "
                     f"{r['best_epoch']}; stopped: {r['stopped']}")
        res["models"][bert4rec_label(minutes)] = r
        save()
    curves = {n: r["curve_minutes_val_ndcg"] for n, r in res["models"].items() if r.get("curve_minutes_val_ndcg")}
    if curves:
        plot(curves, RESULTS / f"{args.name}_curve.png")
    res["name"] = args.name
    write_results(args.name, res, markdown(res))
    partial.unlink(missing_ok=True)
    print(markdown(res))


if __name__ == "__main__":
    main()
