"""One training loop for every model: AdamW, warm-up then decay, gradient clipping, early stopping on
validation NDCG@10, a wall-clock budget, a checkpoint each epoch, and exact resume.

Determinism: every epoch re-seeds dropout and its batch generator from (seed, epoch), so a run killed
after epoch k and resumed from its checkpoint ends with the same weights as a run that never stopped.
Nothing here is global: the loop can be wrapped per rank by torch.distributed later (a task then yields
its rank's share of the batches).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from recsys_pretrain.config import TrainConfig
from recsys_pretrain.io import atomic_path

log = logging.getLogger(__name__)
MONITOR = "ndcg_at_10"


class Task(Protocol):
    """Where batches come from: a model-specific sampler, seeded per epoch."""

    def n_batches(self) -> int: ...

    def batches(self, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]: ...


@dataclass
class FitResult:
    best_epoch: int
    best_metrics: dict[str, float]
    epochs_run: int
    stopped: str  # "early_stopping" | "budget" | "epochs" | "closed_form" (mf's svd solver, no loop)
    train_seconds: float  # the loop counts its validations in; the closed-form solver only its solve
    history: list[dict[str, float]] = field(default_factory=list)
    best_checkpoint: Path | None = None


def lr_lambda(cfg: TrainConfig, total_steps: int | Callable[[], int]) -> Callable[[int], float]:
    """The learning-rate factor at a step: linear warm-up, then `cfg.schedule` over `total_steps` (a number,
    or a function giving the current horizon when it can move, as under a wall-clock budget)."""

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        total = total_steps() if callable(total_steps) else total_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"unknown schedule {cfg.schedule!r}; use cosine, linear or constant")

    return f


def _seed(cfg: TrainConfig, epoch: int) -> int:
    return cfg.seed * 1_000_003 + epoch


class CheckpointMismatch(ValueError):
    """A checkpoint in the output directory was written by another run (config or data differ)."""


def _differences(then: str | None, now: str) -> list[str]:
    """The keys whose values differ between two fingerprints (JSON), flattened: `train.lr: 0.01 -> 0.02`."""
    if then is None:
        return ["the checkpoint records no run fingerprint (written by an older version)"]

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(json.loads(then)), flat(json.loads(now))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def save_checkpoint(path: Path, obj: dict) -> None:
    """torch.save, atomically (a temp file, then rename)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def fit(
    model: nn.Module,
    task: Task,
    cfg: TrainConfig,
    validate: Callable[[nn.Module], dict[str, float]] | None,
    checkpoint_dir: Path | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    monitor: str = MONITOR,
    param_groups: list[dict] | None = None,
    fingerprint: dict | None = None,
    resume: str = "match",
) -> FitResult:
    """Train `model` on `task`; `validate(model)` returns metrics including `monitor` (higher is better);
    None: no validation, the last weights are kept (a refit for a number of epochs chosen before).
    Resumes from `checkpoint_dir/last.pt` when it exists. `on_epoch(epoch, row)` sees each epoch's
    history row. `param_groups` (AdamW groups, e.g. a lower learning rate for pretrained parts)
    replaces the single group of all trainable parameters.

    `fingerprint` identifies the run (its run-defining config and data); checkpoints carry it, and only a
    checkpoint with the same fingerprint is resumed. `resume`: "match" resumes a matching checkpoint and
    refuses another run's (CheckpointMismatch); "restart" starts anew over another run's checkpoint;
    "never" always starts anew."""
    if resume not in ("match", "restart", "never"):
        raise ValueError(f"resume={resume!r}; use match, restart or never")
    ident = json.dumps(fingerprint or {}, sort_keys=True, default=str)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = next(model.parameters()).device  # batches follow the model (CPU here; a GPU if it was moved)
    groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"epoch": 0, "best": -1.0, "best_epoch": 0, "best_metrics": {}, "bad_evals": 0, "elapsed": 0.0,
             "history": [], "horizon": cfg.epochs}
    # The schedule's horizon in epochs: `epochs`, or under a wall-clock budget (with `budget_horizon`) the
    # epochs the budget is measured to fit, so that the decay ends when the budget does. Kept in the
    # checkpoint, so a resumed run follows the same schedule.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, lambda: state["horizon"] * task.n_batches()))
    last = checkpoint_dir / "last.pt" if checkpoint_dir else None
    best_path = checkpoint_dir / "best.pt" if checkpoint_dir else None
    found = last is not None and last.exists() and resume != "never"  # never: not even read (it may not load)
    ckpt = torch.load(last, weights_only=True, map_location=device) if found else None
    if ckpt is not None and ckpt.get("fingerprint") != ident:
        diff = _differences(ckpt.get("fingerprint"), ident)
        if resume == "match":
            raise CheckpointMismatch(
                f"{last}: a checkpoint of another run ({'; '.join(diff[:6])}{'; ...' if len(diff) > 6 else ''}); "
                "refusing to resume it. Use another output directory, or start anew over it "
                "(`pretrain --restart`, pretrain.resume=never)")
        print(f"{last}: a checkpoint of another run ({'; '.join(diff[:3])}): starting anew", file=sys.stderr)
        ckpt = None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        state = {"horizon": cfg.epochs, **ckpt["state"]}
        budget_s = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
        if state.get("stopped") == "budget" and state["elapsed"] < budget_s:  # resumed with more time: go on
            del state["stopped"]
        print(f"resuming from {last} after epoch {state['epoch']} (same config and data)", file=sys.stderr)
    best_state = None
    if ckpt is not None and best_path is not None and best_path.exists():  # only a resumed run's own best
        best = torch.load(best_path, weights_only=True, map_location=device)
        best_state = best["model"] if best.get("fingerprint") == ident else None

    budget = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    stopped = state.get("stopped", "epochs")
    show = cfg.progress and sys.stderr.isatty()
    while state["epoch"] < cfg.epochs and "stopped" not in state:  # a finished run is not trained further
        epoch = state["epoch"] + 1
        t0 = time.perf_counter()
        torch.manual_seed(_seed(cfg, epoch))  # dropout
        gen = torch.Generator().manual_seed(_seed(cfg, epoch) + 1)  # batch order and masking
        model.train()
        total, n = 0.0, 0
        out_of_time = False
        batches = task.batches(gen)
        if show:
            from tqdm import tqdm

            batches = tqdm(batches, total=task.n_batches(), desc=f"epoch {epoch}", leave=False)
        for batch in batches:
            _, loss = model(**{k: v.to(device, non_blocking=True) for k, v in batch.items()})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
            opt.step()
            sched.step()
            total, n = total + loss.item(), n + 1
            if state["elapsed"] + time.perf_counter() - t0 > budget:
                out_of_time = True
                break
        row: dict[str, float] = {"epoch": epoch, "train_loss": total / max(n, 1), "lr": sched.get_last_lr()[0]}
        if validate is not None and (epoch % cfg.eval_every == 0 or out_of_time or epoch == cfg.epochs):
            model.eval()
            with torch.no_grad():
                metrics = validate(model)
            row.update({f"val_{k}": v for k, v in metrics.items()})
            if metrics[monitor] > state["best"]:
                state.update(best=metrics[monitor], best_epoch=epoch, best_metrics=metrics, bad_evals=0)
                best_state = copy.deepcopy(model.state_dict())
                if best_path is not None:
                    save_checkpoint(best_path, {"model": best_state, "epoch": epoch, "metrics": metrics,
                                                "fingerprint": ident})
            else:
                state["bad_evals"] += 1
        state["elapsed"] += time.perf_counter() - t0
        row["elapsed_s"] = state["elapsed"]
        if cfg.budget_horizon and budget < math.inf:  # cost per epoch so far, validation included
            state["horizon"] = max(epoch + 1, min(cfg.epochs, int(budget / (state["elapsed"] / epoch))))
        state["history"].append(row)
        state["epoch"] = epoch
        if out_of_time or state["elapsed"] > budget:
            state["stopped"] = "budget"
        elif state["bad_evals"] >= cfg.patience:
            state["stopped"] = "early_stopping"
        if last is not None:
            save_checkpoint(last, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                   "scheduler": sched.state_dict(), "state": state, "fingerprint": ident})
        log.info("epoch %d %s", epoch, {k: round(v, 4) for k, v in row.items() if k != "epoch"})
        if on_epoch is not None:
            on_epoch(epoch, row)
        if "stopped" in state:
            stopped = state["stopped"]
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(best_epoch=state["best_epoch"], best_metrics=state["best_metrics"],
                     epochs_run=state["epoch"], stopped=stopped, train_seconds=state["elapsed"],
                     history=state["history"], best_checkpoint=best_path)
