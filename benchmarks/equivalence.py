"""Behaviour across a refactor: the same short training runs on the working tree and on an earlier revision,
compared number for number (per-epoch loss and validation, test before and after the refit).

    python benchmarks/equivalence.py --rev 86b1f1a                 # ML-100k, bert4rec 4 epochs and mf (ALS)

The revision is checked out into a temporary git worktree and run with the same interpreter, one thread
each, the same seed and the same prepared data (benchmarks/.cache/suite/ml-100k/prepared, made by suite.py).
Results: benchmarks/results/NAME.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, ROOT, write_results  # noqa: E402

RUN = """
import json, sys
from recsys_pretrain.config import load_config
from recsys_pretrain.train.pretrain import pretrain
model, prep, out = sys.argv[1:4]
over = [f"pretrain.model={model}", f"pretrain.{model}.train.progress=false", *sys.argv[4:]]
res = pretrain(prep, load_config(None, over).pretrain, out)
print(json.dumps({"history": res.fit.history, "test": res.test, "valid": res.valid,
                  "test_no_refit": res.test_no_refit}, default=str))
"""
CASES = {
    "bert4rec": ["pretrain.bert4rec.train.epochs=4", "pretrain.bert4rec.train.eval_every=2",
                 "pretrain.bert4rec.train.threads=1"],
    "mf": [],
}
KEYS = ("train_loss", "val_ndcg_at_10", "val_hr_at_10")


def run(tree: Path, model: str, prep: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", RUN, model, str(prep), str(out), *CASES[model]], cwd=tree, env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True, help="the earlier revision (a commit)")
    ap.add_argument("--prepared", default=str(CACHE / "suite" / "ml-100k" / "prepared"))
    ap.add_argument("--name", default="refactor_equivalence")
    args = ap.parse_args()
    prep = Path(args.prepared)
    if not (prep / "loo.parquet").exists():
        sys.exit(f"{prep}: not prepared; run `python benchmarks/suite.py --datasets ml-100k --models popularity`")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(old), args.rev], cwd=ROOT, check=True)
        try:
            for model in CASES:
                a = run(old, model, prep, Path(tmp) / f"{model}-old")
                b = run(ROOT, model, prep, Path(tmp) / f"{model}-new")
                diffs = [abs(ha[k] - hb[k]) for ha, hb in zip(a["history"], b["history"], strict=True)
                         for k in KEYS if k in ha]
                diffs += [abs(a[s]["ndcg_at_10"] - b[s]["ndcg_at_10"]) for s in ("test", "test_no_refit", "valid")]
                rows.append({"model": model, "epochs": len(a["history"]), "max_abs_difference": max(diffs),
                             "old": {s: a[s]["ndcg_at_10"] for s in ("valid", "test_no_refit", "test")},
                             "new": {s: b[s]["ndcg_at_10"] for s in ("valid", "test_no_refit", "test")},
                             "overrides": CASES[model]})
                print(rows[-1], flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=False)
    lines = [f"# Behaviour across the refactor: {args.rev} against the working tree", "",
             f"Prepared data: `{prep.relative_to(ROOT) if prep.is_relative_to(ROOT) else prep}`; one thread each, the "
             "same seed; per-epoch train loss and validation NDCG@10 / HR@10, validation and test NDCG@10 "
             "before and after the refit.", "",
             "| model | epochs | valid NDCG@10 old / new | test (no refit) old / new | test old / new | max abs difference |",
             "|---|---:|---|---|---|---:|"]
    for r in rows:
        o, n = r["old"], r["new"]
        lines.append(f"| {r['model']} | {r['epochs']} | {o['valid']:.6f} / {n['valid']:.6f} | "
                     f"{o['test_no_refit']:.6f} / {n['test_no_refit']:.6f} | {o['test']:.6f} / {n['test']:.6f} | "
                     f"{r['max_abs_difference']:.3g} |")
    write_results(args.name, {"rev": args.rev, "rows": rows}, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
