"""Quality at world size 2 against world size 1 on ML-1M, at the same number of epochs and the same global
batch: `recsys-pretrain pretrain` as one process, then with `--nproc 2` (two ranks under torchrun, gloo).

    python benchmarks/distributed_ml1m.py --epochs 3

Two CPU cores cannot show a speed-up (the ranks share them), so only quality is compared. Dropout draws
differ per rank, so the two runs agree within seed noise rather than exactly (tests/test_distributed.py checks
exact agreement without dropout). Reads the prepared ML-1M that benchmarks/suite.py makes. Results:
benchmarks/results/NAME.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, RESULTS, ROOT, write_results  # noqa: E402


def run(nproc: int, prepared: Path, out: Path, args, seed: int = 0) -> dict:
    cmd = [sys.executable, "-m", "recsys_pretrain.cli", "pretrain", "--model", args.model, "--data", str(prepared),
           "--out", str(out), "--no-tracking", "--nproc", str(nproc), f"{args.model}.train.epochs={args.epochs}",
           f"{args.model}.train.eval_every={args.epochs}", f"{args.model}.train.progress=false",
           f"{args.model}.train.patience=100", "refit=false",
           f"{args.model}.train.threads={max(1, 2 // nproc)}", f"{args.model}.train.seed={seed}"]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"world size {nproc} failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout[done.stdout.index("{"):])
    return {"world_size": nproc, "seed": seed, "seconds": time.perf_counter() - t, "valid": report["valid"], "test": report["test"],
            "best_epoch": report["best_epoch"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bert4rec")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--prepared", default=str(CACHE / "suite" / "ml-1m" / "prepared"))
    ap.add_argument("--name", default="distributed_ml1m")
    ap.add_argument("--noise-seed", type=int, help="also (or, with --append, only) one process with this train.seed: "
                                                     "how far seed noise alone moves the figures")
    ap.add_argument("--append", action="store_true", help="add the --noise-seed run to NAME.json's rows")
    args = ap.parse_args()
    prepared = Path(args.prepared)
    if not (prepared / "loo.parquet").exists():
        raise SystemExit(f"{prepared}: not prepared; run `python benchmarks/suite.py --datasets ml-1m --models popularity`")
    rows = json.loads((RESULTS / f"{args.name}.json").read_text())["rows"] if args.append else []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.append:
            rows += [run(n, prepared, Path(tmp) / f"ws{n}", args) for n in (1, 2)]
        if args.noise_seed is not None:
            rows.append(run(1, prepared, Path(tmp) / "noise", args, seed=args.noise_seed))
    lines = [f"# ML-1M {args.model}: world size 2 against 1 at {args.epochs} epochs", "",
             "The same command, the same global batch and schedule; one process (2 threads) against two ranks "
             "under torchrun (1 thread each, gloo). Full ranking, leave-last-out, no refit. Two cores: no speed-up "
             "is claimed.", "",
             "| world size | train.seed | valid NDCG@10 | test NDCG@10 | test HR@10 | wall s |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['world_size']} | {r.get('seed', 0)} | {r['valid']['ndcg_at_10']:.4f} | {r['test']['ndcg_at_10']:.4f} | "
                     f"{r['test']['hr_at_10']:.4f} | {r['seconds']:.0f} |")
    a, b = (r["test"]["ndcg_at_10"] for r in rows[:2])
    lines += ["", f"Test NDCG@10 ratio (2 ranks / 1 process, seed 0): {b / a:.3f}."]
    if len(rows) > 2:
        c = rows[2]["test"]["ndcg_at_10"]
        lines.append(f"Seed noise: one process at train.seed {rows[2]['seed']} against seed 0: {c / a:.3f}.")
    write_results(args.name, {"model": args.model, "epochs": args.epochs, "rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
