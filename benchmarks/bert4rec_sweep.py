"""BERT4Rec recipe sweep: validation NDCG@10 per epoch for several training recipes on one prepared dataset.

    python benchmarks/bert4rec_sweep.py --data data/ml-1m/prepared --epochs 40 --device cuda --parallel 10

It measures learning per *epoch* (on any device: a GPU runs the sweep in minutes); the CPU cost of an
epoch of each recipe is measured separately (`--time-epochs 1`, on the CPU), and the two together say
which recipe learns fastest per CPU second. Results: benchmarks/results/bert4rec_sweep.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RECIPES: dict[str, list[str]] = {
    "plain": ["mask_prob=0.2", "last_item_prob=0.0", "window=last", "train.lr=0.001"],
    "last10": ["last_item_prob=0.1", "window=last", "train.lr=0.001"],
    "last10_random": ["last_item_prob=0.1", "window=random", "train.lr=0.001"],
    "last25_lr2": ["last_item_prob=0.25", "train.lr=0.002"],
    "mask40_lr2": ["mask_prob=0.4", "last_item_prob=0.1", "train.lr=0.002"],
    "lr2_b256": ["last_item_prob=0.1", "train.lr=0.002", "train.batch_size=256"],
    "lr3_b256": ["last_item_prob=0.1", "train.lr=0.003", "train.batch_size=256"],
    "layers3_lr2": ["n_layers=3", "last_item_prob=0.1", "train.lr=0.002"],
    "drop20_lr2": ["dropout=0.2", "last_item_prob=0.1", "train.lr=0.002"],
    "len100_lr2": ["max_len=100", "last_item_prob=0.1", "train.lr=0.002"],
    "d128_lr1": ["dim=128", "n_heads=4", "last_item_prob=0.1", "train.lr=0.001"],
    "mask30_last20_lr2": ["mask_prob=0.3", "last_item_prob=0.2", "train.lr=0.002"],
}
# The chosen default recipe (128 d, mask 0.3, last-item 0.2, lr 2e-3) against changes to its first epochs.
EARLY: dict[str, list[str]] = {
    "default": [],
    "unbucketed": ["length_buckets=false", "train.budget_horizon=true"],
    "torch_init": ["init_std=null"],
    "no_warmup": ["train.warmup_steps=0", "train.budget_horizon=true"],
    "torch_init_no_warmup": ["init_std=null", "train.warmup_steps=0"],
    "init_0.1": ["init_std=0.1"],
    "no_warmup_lr4": ["train.warmup_steps=0", "train.lr=0.004", "train.budget_horizon=true"],
    # learning per epoch on a fixed schedule (--epochs), stopped by --minutes
    "token_weighted_fixed": ["token_weighted=true"],
    "lr4_no_warmup_fixed": ["train.lr=0.004", "train.warmup_steps=0"],
    "b64_fixed": ["train.batch_size=64"],
    "b32_fixed": ["train.batch_size=32"],
    "b16_fixed": ["train.batch_size=16"],
    "b8_fixed": ["train.batch_size=8"],
    "b16_token_weighted_fixed": ["train.batch_size=16", "token_weighted=true"],
    "b32_lr1_fixed": ["train.batch_size=32", "train.lr=0.001"],
}
# Each family pins the base it was measured on, so that its commands reproduce it as the defaults move:
# the sweep (bert4rec_sweep.md): 64 d, 2 heads, mask 0.2, last-item 0.1, lr 1e-3, batch 128, random windows,
# unsorted batches; the early runs (bert4rec_early.md): the defaults with batch 128 and the plain mean loss.
SWEEP_BASE = ["dim=64", "n_heads=2", "mask_prob=0.2", "last_item_prob=0.1", "window=random", "train.lr=0.001",
              "train.batch_size=128", "length_buckets=false", "token_weighted=false"]
EARLY_BASE = ["train.batch_size=128", "token_weighted=false"]
RECIPES = {k: [*SWEEP_BASE, *v] for k, v in RECIPES.items()}  # later overrides win
RECIPES.update({f"early_{k}": [*EARLY_BASE, *v] for k, v in EARLY.items()})

ONE = """
import json, sys, time, torch
from recsys_pretrain.config import load_config
from recsys_pretrain.data.prepared import load_prepared
from recsys_pretrain.evaluation import evaluate
from recsys_pretrain.models.bert4rec import BERT4Rec, MaskedItemTask
from recsys_pretrain.train.loop import fit
data_dir, device, epochs, eval_every, out = sys.argv[1:6]
over = sys.argv[6:]
cfg = load_config(None, [f"pretrain.bert4rec.{o}" for o in over] + [
    f"pretrain.bert4rec.train.epochs={epochs}", f"pretrain.bert4rec.train.eval_every={eval_every}",
    "pretrain.bert4rec.train.patience=1000", "pretrain.bert4rec.train.progress=false"]).pretrain.bert4rec
torch.manual_seed(cfg.train.seed)
data = load_prepared(data_dir)
model = BERT4Rec(data.n_items, cfg).to(device)
task = MaskedItemTask(data.train_seqs, cfg, data.n_items, cfg.train.batch_size)
t0 = time.perf_counter()
res = fit(model, task, cfg.train, lambda m: evaluate(m, data, "valid", 1024))
test = evaluate(model, data, "test", 1024)
json.dump({"overrides": over, "device": device, "history": res.history, "best_epoch": res.best_epoch,
           "best_val": res.best_metrics, "test_at_best_val": test, "seconds": time.perf_counter() - t0},
          open(out, "w"))
"""


TIME_ONE = """
import dataclasses, json, sys, time, torch
from recsys_pretrain.config import load_config
from recsys_pretrain.data.prepared import load_prepared
from recsys_pretrain.evaluation import evaluate
from recsys_pretrain.models.bert4rec import BERT4Rec, MaskedItemTask
from recsys_pretrain.train.loop import fit
data_dir, epochs = sys.argv[1:3]
cfg = load_config(None, [f"pretrain.bert4rec.{o}" for o in sys.argv[3:]]).pretrain.bert4rec
tcfg = dataclasses.replace(cfg.train, epochs=int(epochs), eval_every=10**6, progress=False)  # validates once, at the end
torch.manual_seed(0)
data = load_prepared(data_dir)
val_s = []

def validate(m):
    t0 = time.perf_counter()
    out = evaluate(m, data, "valid", tcfg.eval_batch_size)
    val_s.append(time.perf_counter() - t0)
    return out

res = fit(BERT4Rec(data.n_items, cfg), MaskedItemTask(data.train_seqs, cfg, data.n_items, tcfg.batch_size), tcfg, validate)
print(json.dumps({"train_epoch_s": (res.train_seconds - sum(val_s)) / res.epochs_run, "validation_s": val_s[-1]}))
"""


def time_recipes(args) -> None:
    """CPU cost of each recipe, one after another: seconds per training epoch and per full validation."""
    rows = {}
    for name in args.recipes:
        cmd = [sys.executable, "-c", TIME_ONE, args.data, str(args.time_epochs), *RECIPES[name],
               f"train.threads={args.threads}"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows[name] = {"overrides": RECIPES[name], **json.loads(out.stdout.strip().splitlines()[-1])}
        print(name, rows[name], flush=True)
    path = Path(args.out).with_name(f"{Path(args.out).name}-cpu_cost.json")
    path.write_text(json.dumps({"args": vars(args), "results": rows}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/ml-1m/prepared")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--recipes", nargs="*", default=[r for r in RECIPES if not r.startswith("early_")])
    ap.add_argument("--minutes", type=float, default=0, help="wall-clock budget per recipe (0: none); the "
                    "schedule spans --epochs unless a recipe sets train.budget_horizon=true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per recipe (0: PyTorch's default)")
    ap.add_argument("--out", default="benchmarks/results/bert4rec_sweep")
    ap.add_argument("--time-epochs", type=int, default=0,
                    help="instead of the sweep: time this many training epochs and one validation per recipe")
    args = ap.parse_args()
    if args.time_epochs:
        return time_recipes(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pending = list(args.recipes)
    running: list[tuple[str, subprocess.Popen, Path]] = []
    results = {}
    t0 = time.time()
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            path = out.with_name(f"{out.name}-{name}.json")
            cmd = [sys.executable, "-c", ONE, args.data, args.device, str(args.epochs), str(args.eval_every),
                   str(path), *RECIPES[name], f"train.threads={args.threads}",
                   f"train.max_minutes={args.minutes or 'null'}"]
            running.append((name, subprocess.Popen(cmd, stderr=open(f"{path}.log", "w")), path))
        time.sleep(2)
        for item in list(running):
            name, proc, path = item
            if proc.poll() is not None:
                running.remove(item)
                results[name] = json.loads(path.read_text()) if proc.returncode == 0 else {"failed": proc.returncode}
                print(f"{name}: done after {time.time() - t0:.0f}s", flush=True)
    (out.with_suffix(".json")).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    for name, r in results.items():
        if "failed" in r:
            print(name, "FAILED")
            continue
        curve = [(h["epoch"], round(h["val_ndcg_at_10"], 4)) for h in r["history"] if "val_ndcg_at_10" in h]
        print(name, "best val", round(r["best_val"]["ndcg_at_10"], 4), "@", r["best_epoch"], "test",
              round(r["test_at_best_val"]["ndcg_at_10"], 4), curve[::2])


if __name__ == "__main__":
    main()
