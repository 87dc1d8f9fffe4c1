"""Defaults derived from the data: the settings a model leaves unset (None) are filled by written rules from
the dataset's statistics, so that a first run on an unseen log starts from a recipe sized for it. Explicit
settings always win; the rules applied are returned so that every run records them.

Each model's `recipe` (models/base.py) applies its rules; the sequence models share `sequence_recipe`.
The rules (BERT4Rec, and SASRec without the [MASK] slot), each anchored on ML-1M, where the resulting recipe is the one measured there
(benchmarks/results/pretrain_ml1m.md):
- max_len: the 90th percentile of the training history lengths, plus the [MASK] slot, rounded up to a
  multiple of 10, within [20, 200]. Longer windows cost attention for padding only most users need.
- dim: 128 from 500k training interactions up, else 64: a small log does not fill 128 dimensions.
- batch_size: about 2,048 real tokens a batch (the mean clipped history length into 2,048, as a power of two
  within [16, 256]). ML-1M's histories give 16, where small batches left the early plateau in the fewest
  steps at no extra cost per epoch; short histories get larger batches so that an epoch is not thousands of
  one-token steps.
- epochs (the schedule's horizon): about 20,000 optimizer steps, at least 50 epochs: ML-1M's 50 epochs at
  batch 16 are 19k steps; a small log gets more epochs of fewer steps each.
- eval_every: about every 1,000 optimizer steps (ML-1M: every 3 epochs, as measured there), and at least
  every 5 epochs. On a small log 1,000 steps are hundreds of passes over the data: the suite's sasrec runs
  on LastFM and Taobao peaked at their first validation (epoch 56 and 500), long overfit by then. A
  validation costs about a third of an epoch, so every 5 epochs costs under 7% of the training time.
- patience: when validation comes more often than every ~1,000 steps, the patience (in validations) is
  scaled so that early stopping still waits ~patience x 1,000 steps: validating more often finds the best
  epoch, it does not shorten the wait. (Counted in validations of 5 epochs, bert4rec on the Taobao head
  stopped on noise at epoch 165 of a run that improves for thousands.) Validations inside the learning-rate
  warm-up do not count towards the patience at all (train/loop.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

TOKENS_PER_BATCH = 2048
STEPS_HORIZON = 20_000
STEPS_PER_EVAL = 1_000
EPOCHS_PER_EVAL_MAX = 5
DIM_128_FROM = 500_000  # training interactions


def history_stats(train_seqs: list[np.ndarray]) -> dict:
    """Users, training interactions and history-length percentiles of the training sequences."""
    lengths = np.fromiter((len(s) for s in train_seqs), dtype=np.int64, count=len(train_seqs))
    lengths = lengths[lengths > 0]
    if not len(lengths):
        return {"users": 0, "interactions": 0, "p50": 0.0, "p90": 0.0, "mean": 0.0}
    return {"users": int(len(lengths)), "interactions": int(lengths.sum()), "p50": float(np.percentile(lengths, 50)),
            "p90": float(np.percentile(lengths, 90)), "mean": float(lengths.mean()), "lengths": lengths}


def _pow2(x: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, 2 ** round(math.log2(max(x, 1.0))))))


def sequence_recipe(cfg: Any, stats: dict, extra_slot: bool) -> tuple[Any, dict[str, str]]:
    """A sequence model's config (fields dim, max_len, train) with its unset fields filled from `stats`
    (history_stats); and, per filled field, the rule. `extra_slot`: the input holds one position past the
    history (BERT4Rec's [MASK])."""
    why: dict[str, str] = {}
    max_len = cfg.max_len
    if max_len is None:
        slot = 1 if extra_slot else 0
        max_len = int(min(200, max(20, math.ceil((stats["p90"] + slot) / 10) * 10)))
        why["max_len"] = (f"p90 history {stats['p90']:g}{' + [MASK]' if extra_slot else ''}, rounded up to 10, "
                          f"in [20, 200] -> {max_len}")
    dim = cfg.dim
    if dim is None:
        dim = 128 if stats["interactions"] >= DIM_128_FROM else 64
        why["dim"] = f"{stats['interactions']:,} training interactions {'>=' if dim == 128 else '<'} {DIM_128_FROM:,} -> {dim}"
    train = cfg.train
    batch = train.batch_size
    if batch is None:
        clipped = float(np.minimum(stats.get("lengths", np.zeros(1)), max_len).mean()) if stats["users"] else 1.0
        batch = _pow2(TOKENS_PER_BATCH / clipped, 16, 256)
        why["train.batch_size"] = f"{TOKENS_PER_BATCH} tokens / mean clipped history {clipped:.1f} -> {batch}"
    steps = max(1, math.ceil(stats["users"] / batch))  # optimizer steps an epoch
    epochs = train.epochs
    if epochs is None:
        epochs = int(max(50, math.ceil(STEPS_HORIZON / steps)))
        why["train.epochs"] = f"~{STEPS_HORIZON:,} steps at {steps} an epoch, at least 50 -> {epochs}"
    every, patience = train.eval_every, train.patience
    if every is None:
        by_steps = max(1, round(STEPS_PER_EVAL / steps))
        every = min(EPOCHS_PER_EVAL_MAX, by_steps)
        why["train.eval_every"] = (f"~{STEPS_PER_EVAL:,} steps at {steps} an epoch, at most every "
                                   f"{EPOCHS_PER_EVAL_MAX} epochs -> every {every} epoch(s)")
        if every < by_steps:  # validated more often than every ~1,000 steps: the same patience in steps
            patience = math.ceil(train.patience * by_steps / every)
            why["train.patience"] = (f"{train.patience} x ~{STEPS_PER_EVAL:,} steps, validated every {every} "
                                     f"epoch(s) of {steps} steps -> {patience} validations")
    train = dataclasses.replace(train, batch_size=batch, epochs=epochs, eval_every=every, patience=patience)
    return dataclasses.replace(cfg, max_len=max_len, dim=dim, train=train), why
