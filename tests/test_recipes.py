"""Data-derived defaults: the rules reproduce ML-1M's measured recipe on ML-1M-like histories, size short
histories differently, and never override an explicit setting."""

import dataclasses
import math

import numpy as np

from recsys_pretrain.config import load_config
from recsys_pretrain.models import resolve
from recsys_pretrain.models.bert4rec import BERT4RecConfig


def _seqs(lengths):
    return [np.arange(1, n + 1) for n in lengths]


def test_ml1m_like_histories_give_the_ml1m_recipe():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(96), 1.0, 6040), 18, 2300).astype(int)  # median ~96, 6,040 users
    cfg, why = resolve("bert4rec", BERT4RecConfig(), _seqs(lengths))
    assert (cfg.dim, cfg.max_len, cfg.train.batch_size, cfg.train.epochs, cfg.train.eval_every) == (128, 200, 16, 53, 3)
    assert set(why) == {"dim", "max_len", "train.batch_size", "train.epochs", "train.eval_every"}


def test_short_sparse_histories_get_a_smaller_model_shorter_window_and_larger_batches():
    rng = np.random.default_rng(0)
    lengths = 3 + rng.poisson(4, 20000)  # median ~7, 20,000 users
    cfg, _ = resolve("bert4rec", BERT4RecConfig(), _seqs(lengths))
    assert cfg.dim == 64 and cfg.max_len == 20 and cfg.train.batch_size == 256
    assert cfg.train.epochs == 20000 // 79 + 1 and cfg.train.eval_every == 5  # 79 steps an epoch: 1,000 steps
    # would be 13 passes over the data between validations; at most 5, and the patience waits as many steps
    assert cfg.train.patience == math.ceil(BERT4RecConfig().train.patience * 13 / 5)


def test_explicit_settings_win():
    base = load_config(None, ["pretrain.bert4rec.dim=32", "pretrain.bert4rec.train.batch_size=8"]).pretrain.bert4rec
    cfg, why = resolve("bert4rec", base, _seqs([5] * 100))
    assert cfg.dim == 32 and cfg.train.batch_size == 8 and "dim" not in why and "train.batch_size" not in why
    assert cfg.max_len == 20
    fixed = dataclasses.replace(cfg)
    assert resolve("bert4rec", fixed, _seqs([5] * 100)) == (fixed, {})


def test_a_tiny_log_is_validated_every_few_epochs():
    """477 users at batch 256 are 2 steps an epoch: 1,000 steps between validations would be 500 passes, long
    past the best epoch; it is validated every 5 (the warm-up spends no patience: test_models)."""
    cfg, _ = resolve("bert4rec", BERT4RecConfig(), _seqs([6] * 477))
    assert cfg.train.batch_size == 256 and cfg.train.eval_every == 5 and cfg.train.epochs == 10000
    assert cfg.train.patience == BERT4RecConfig().train.patience * 500 // 5  # still ~patience x 1,000 steps
