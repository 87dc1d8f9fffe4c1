"""One training loop for every model: AdamW, warm-up then decay, gradient clipping, early stopping on
validation NDCG@10, a wall-clock budget, a checkpoint each epoch, and exact resume.

Determinism: every epoch re-seeds dropout and its batch generator from (seed, epoch), so a run killed
after epoch k and resumed from its checkpoint ends with the same weights as a run that never stopped.

Data parallel (run under `torchrun`, recsys_pretrain/distributed.py): the same loop, one process per rank.
- Batches: every rank draws the SAME global batch of `batch_size` examples from the same seeded generator
  and trains on its contiguous share (`distributed.shard`); per-batch shared tensors (sampled negatives,
  their log q, the batch's loss weight) stay whole. Each rank so sees a disjoint part of every epoch, and
  length-bucketed batches stay bucketed. Collating the whole global batch on every rank costs CPU time,
  no communication.
- Gradients: the model is wrapped in DistributedDataParallel, which averages gradients over the ranks. A
  batch's loss is a mean over its examples, masked items or target weight (`distributed.loss_count`); each
  rank's loss is multiplied by world x (its count / the global batch's count), counted locally since every
  rank holds the global batch. The averaged gradient is then the gradient of the global batch's loss: world
  size 2 and world size 1 on the same global batches take the same steps (up to float summation order, and
  dropout, whose masks are drawn per rank).
- Learning rate: the global batch is the configured `batch_size` whatever the world size, so the steps per
  epoch, the schedule and the learning rate do not change with it (no linear scaling rule applies: more
  ranks share a batch, they do not make it larger).
- Validation runs on rank 0 alone (on the unwrapped model, which every rank holds the same); rank 0 then
  decides (best epoch, early stopping, budget) and broadcasts the loop's state, so all ranks stop together.
  A wall-clock budget that runs out mid-epoch stops every rank at the same step (one flag all-reduced per
  step, only under a budget).
- Files: only rank 0 writes checkpoints (atomically, as in one process), calls `on_epoch` and prints. A
  checkpoint holds the unwrapped model, so any world size resumes it; all ranks read the same file (one
  machine, or a shared filesystem).
World size 1 (no torchrun) is the plain loop: no wrapper, no scaling, no collective.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from recsys_pretrain import distributed as dist
from recsys_pretrain.io import atomic_path

if TYPE_CHECKING:  # annotations only: the loop reads a TrainConfig's fields, whichever module defines it
    from recsys_pretrain.train_config import TrainConfig

log = logging.getLogger(__name__)
MONITOR = "ndcg_at_10"


class Task(Protocol):
    """Where batches come from: a model-specific sampler, seeded per epoch. A batch is the model's forward
    kwargs; under data parallelism its tensors have a row per example, but for `distributed.SHARED_KEYS`."""

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


@dataclass
class LoopState:
    """What the loop carries from epoch to epoch, and what a checkpoint keeps of it (`to_dict`, plain types:
    checkpoints load with weights_only=True)."""

    epoch: int = 0  # epochs done
    best: float = -1.0  # best validation `monitor` so far
    best_epoch: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)
    bad_evals: int = 0  # evaluations since the best one
    elapsed: float = 0.0  # seconds of training and validation, over all (resumed) runs
    history: list[dict[str, float]] = field(default_factory=list)
    # The schedule's horizon in epochs: `epochs`, or under a wall-clock budget (with `budget_horizon`) the
    # epochs the budget is measured to fit, so that the decay ends when the budget does.
    horizon: int | None = None
    stopped: str | None = None  # why the run ended: "budget" | "early_stopping"; None while it may go on

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["stopped"] is None:  # the checkpoint layout of before: "stopped" only once stopped
            del d["stopped"]
        return d

    @classmethod
    def from_dict(cls, d: dict, horizon: int | None) -> LoopState:
        """From a checkpoint's state; `horizon` where it records none."""
        return cls(**{"horizon": horizon, **d})


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


def epoch_line(row: dict[str, float], epochs: int | None) -> str:
    """One line per epoch for logs (what the progress bar shows on a terminal): epoch, train loss, the
    validation figures, elapsed seconds, learning rate."""
    val = "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("val_"))
    return (f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}" + (f"  {val}" if val else "")
            + f"  elapsed {row['elapsed_s']:.1f}s  lr {row['lr']:.3g}")


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
    "never" always starts anew.

    Under torchrun (world size > 1) every rank calls this with the same arguments; the global batch stays
    `cfg.batch_size` and the learning rate `cfg.lr` (module docstring). `validate`, `on_epoch` and every file
    write happen on rank 0 only; every rank returns the same FitResult and ends with the same weights."""
    if resume not in ("match", "restart", "never"):
        raise ValueError(f"resume={resume!r}; use match, restart or never")
    dist.init_from_env()
    world, rank = dist.world_size(), dist.rank()
    main = rank == 0
    ident = json.dumps(fingerprint or {}, sort_keys=True, default=str)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = next(model.parameters()).device  # batches follow the model (CPU here; a GPU if it was moved)
    groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = LoopState(horizon=cfg.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, lambda: state.horizon * task.n_batches()))
    last = checkpoint_dir / "last.pt" if checkpoint_dir else None
    best_path = checkpoint_dir / "best.pt" if checkpoint_dir else None
    found = last is not None and last.exists() and resume != "never"  # never: not even read (it may not load)
    if world > 1:  # every rank reads the same checkpoint; rank 0 decides whether one is there
        found = dist.broadcast_object(found)
    ckpt = torch.load(last, weights_only=True, map_location=device) if found else None
    if ckpt is not None and ckpt.get("fingerprint") != ident:
        diff = _differences(ckpt.get("fingerprint"), ident)
        if resume == "match":
            raise CheckpointMismatch(
                f"{last}: a checkpoint of another run ({'; '.join(diff[:6])}{'; ...' if len(diff) > 6 else ''}); "
                "refusing to resume it. Use another output directory, or start anew over it "
                "(`pretrain --restart`, pretrain.resume=never)")
        if main:
            print(f"{last}: a checkpoint of another run ({'; '.join(diff[:3])}): starting anew", file=sys.stderr)
        ckpt = None
    budget = cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        state = LoopState.from_dict(ckpt["state"], horizon=cfg.epochs)
        if state.stopped == "budget" and state.elapsed < budget:  # resumed with more time: go on
            state.stopped = None
        if main:
            print(f"resuming from {last} after epoch {state.epoch} (same config and data)", file=sys.stderr)
    best_state = None
    if ckpt is not None and best_path is not None and best_path.exists():  # only a resumed run's own best
        best = torch.load(best_path, weights_only=True, map_location=device)
        best_state = best["model"] if best.get("fingerprint") == ident else None

    net: nn.Module = model  # what the batches go through: the model, or its DDP wrapper
    if world > 1:  # gradients as views into DDP's buckets: no second copy of (large) embedding gradients
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      gradient_as_bucket_view=True)
    stopped = state.stopped or "epochs"
    show = cfg.progress and sys.stderr.isatty() and main
    lines = not (cfg.progress and sys.stderr.isatty()) and main  # a line per epoch where no bar shows
    while state.epoch < cfg.epochs and state.stopped is None:  # a finished run is not trained further
        epoch = state.epoch + 1
        t0 = time.perf_counter()
        # dropout: per rank under data parallelism (each rank's examples get their own masks)
        torch.manual_seed(_seed(cfg, epoch) if world == 1 else _seed(cfg, epoch) * 1_009 + rank)
        gen = torch.Generator().manual_seed(_seed(cfg, epoch) + 1)  # batch order and masking: alike on all ranks
        net.train()
        total, n = 0.0, 0
        out_of_time = False
        batches = task.batches(gen)
        if show:
            from tqdm import tqdm

            batches = tqdm(batches, total=task.n_batches(), desc=f"epoch {epoch}", leave=False)
        for batch in batches:
            if world > 1:
                batch, scale = dist.part(batch, rank, world)
            _, loss = net(**{k: v.to(device, non_blocking=True) for k, v in batch.items()})
            if world > 1:
                loss = loss * scale  # this rank's part of the global batch's loss, times the world (DDP averages)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
            opt.step()
            sched.step()
            total, n = total + loss.item(), n + 1
            late = state.elapsed + time.perf_counter() - t0 > budget
            if budget < math.inf and world > 1:
                late = dist.any_rank(late)  # all ranks stop at the same step
            if late:
                out_of_time = True
                break
        if world > 1:  # the global batches' mean loss: the mean over ranks of the scaled losses
            total = dist.all_reduce_mean({"total": total})["total"]
        row: dict[str, float] = {"epoch": epoch, "train_loss": total / max(n, 1), "lr": sched.get_last_lr()[0]}
        if main:
            if validate is not None and (epoch % cfg.eval_every == 0 or out_of_time or epoch == cfg.epochs):
                model.eval()
                with torch.no_grad():
                    metrics = validate(model)
                row.update({f"val_{k}": v for k, v in metrics.items()})
                if metrics[monitor] > state.best:
                    state.best, state.best_epoch, state.best_metrics, state.bad_evals = metrics[monitor], epoch, metrics, 0
                    best_state = copy.deepcopy(model.state_dict())
                    if best_path is not None:
                        save_checkpoint(best_path, {"model": best_state, "epoch": epoch, "metrics": metrics,
                                                    "fingerprint": ident})
                elif sched.last_epoch >= cfg.warmup_steps:  # no patience spent while the rate is still warming up
                    state.bad_evals += 1
            state.elapsed += time.perf_counter() - t0
            row["elapsed_s"] = state.elapsed
            if cfg.budget_horizon and budget < math.inf:  # cost per epoch so far, validation included
                state.horizon = max(epoch + 1, min(cfg.epochs, int(budget / (state.elapsed / epoch))))
            state.history.append(row)
            state.epoch = epoch
            if out_of_time or state.elapsed > budget:
                state.stopped = "budget"
            elif state.bad_evals >= cfg.patience:
                state.stopped = "early_stopping"
            if last is not None:
                save_checkpoint(last, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                       "scheduler": sched.state_dict(), "state": state.to_dict(),
                                       "fingerprint": ident})
            log.info("epoch %d %s", epoch, {k: round(v, 4) for k, v in row.items() if k != "epoch"})
            if lines:
                print(epoch_line(row, cfg.epochs), file=sys.stderr, flush=True)
        if world > 1:  # rank 0's decision (best epoch, stop, horizon, elapsed) on every rank
            state = dist.broadcast_object(state)
            row = state.history[-1]
            if rank != 0 and state.best_epoch == epoch:  # every rank holds the same weights: keep its own copy
                best_state = copy.deepcopy(model.state_dict())
        if on_epoch is not None and main:
            on_epoch(epoch, row)
        if state.stopped is not None:
            stopped = state.stopped
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(best_epoch=state.best_epoch, best_metrics=state.best_metrics,
                     epochs_run=state.epoch, stopped=stopped, train_seconds=state.elapsed,
                     history=state.history, best_checkpoint=best_path)
