"""The training loop's config, shared by every model's own config class.

It sits below `config.py` (which composes the stages) so that each model file can hold its config class and
import this one without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    """The training loop, shared by every model."""

    epochs: int | None = 200  # the learning-rate schedule's horizon; early stopping usually ends sooner
    batch_size: int | None = 128  # None: derived from the data by the model's recipe
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 200
    schedule: str = "cosine"  # cosine | linear | constant (after warm-up)
    grad_clip: float = 1.0
    patience: int = 5  # evaluations without a better validation NDCG@10 before stopping
    eval_every: int | None = 1  # epochs between validations (None: derived by the model's recipe)
    max_minutes: float | None = None  # wall-clock budget for training (evaluation included)
    # Under max_minutes, decay the schedule over the epochs the budget fits. Off by default: decaying on the
    # early plateau measured worse (benchmarks/results/pretrain_ml1m.md).
    budget_horizon: bool = False
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = PyTorch's default
    eval_batch_size: int = 512
    progress: bool = True
