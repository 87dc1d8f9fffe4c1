"""RecTools BERT4Rec / SASRec as peers of `pretrain_ml1m.py`; runs in .venv-bench (RecTools is not a dependency).

    .venv-bench/bin/python benchmarks/_rectools_peer.py {bert4rec|sasrec} SPLIT.npz OUT.json MINUTES

SPLIT.npz holds the benchmark's own leave-last-out split (item indices, per-user offsets): the model is fitted
on the training sequences, chosen on validation, tested on the last item with the training + validation items
as history, every item ranked and the user's history excluded (`filter_viewed=True`). Training runs one epoch
at a time (`fit_partial`) until the wall-clock budget is spent; validation NDCG@10 after every epoch, counted
in the budget as ours is; the best-on-validation weights are tested.
"""

from __future__ import annotations

import copy
import json
import sys
import time

import numpy as np
import pandas as pd
import torch
from rectools import Columns
from rectools.dataset import Dataset
from rectools.models import BERT4RecModel, SASRecModel
from rectools.models.nn.item_net import IdEmbeddingsItemNet


def frame(items: np.ndarray, offsets: np.ndarray) -> pd.DataFrame:
    users = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    pos = np.arange(len(items)) - np.repeat(offsets[:-1], np.diff(offsets))  # order within the user's sequence
    return pd.DataFrame({Columns.User: users, Columns.Item: items, Columns.Weight: 1.0,
                         Columns.Datetime: pd.to_datetime(pos, unit="s")})


def hit_ndcg(reco: pd.DataFrame, targets: np.ndarray) -> dict:
    """HR@10 / NDCG@10 over every user with a target: a user without a recommendation counts as a miss."""
    has = np.flatnonzero(targets >= 0)
    r = reco[[Columns.User, Columns.Item, Columns.Rank]]
    r = r[r[Columns.Item].to_numpy() == targets[r[Columns.User].to_numpy()]]
    ranks = r[Columns.Rank].to_numpy()
    return {"hr_at_10": float(len(ranks) / len(has)), "ndcg_at_10": float((1 / np.log2(ranks + 1)).sum() / len(has))}


def main() -> None:
    kind, split_path, out_path, minutes = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    torch.set_num_threads(2)
    torch.manual_seed(0)
    np.random.seed(0)
    z = np.load(split_path)
    train = Dataset.construct(frame(z["train_items"], z["train_offsets"]))
    test_hist = Dataset.construct(frame(z["test_hist_items"], z["test_hist_offsets"]))
    valid_t, test_t = z["valid"], z["test"]
    users_v, users_t = np.flatnonzero(valid_t >= 0), np.flatnonzero(test_t >= 0)
    # Their defaults (mask 0.15, dropout 0.2, Adam 1e-3, batch 128, full softmax) at 64 d, 2 blocks, 4 heads
    # and length 200, on item ids only (ML-1M here has no features).
    common = dict(n_factors=64, n_blocks=2, n_heads=4, session_max_len=200, loss="softmax", lr=1e-3,
                  batch_size=128, dropout_rate=0.2, epochs=1, item_net_block_types=(IdEmbeddingsItemNet,),
                  deterministic=True, recommend_batch_size=512)
    model = BERT4RecModel(mask_prob=0.15, **common) if kind == "bert4rec" else SASRecModel(**common)
    curve, best, best_state = [], -1.0, None
    t0 = time.perf_counter()
    epoch = 0
    while time.perf_counter() - t0 < minutes * 60:
        te = time.perf_counter()
        model.fit_partial(train, min_epochs=1, max_epochs=1)
        epoch_s = time.perf_counter() - te
        epoch += 1
        reco = model.recommend(users=users_v, dataset=train, k=10, filter_viewed=True)
        v = hit_ndcg(reco, valid_t)
        elapsed = time.perf_counter() - t0
        curve.append({"epoch": epoch, "elapsed_s": elapsed, "epoch_s": epoch_s, "val_ndcg_at_10": v["ndcg_at_10"]})
        print(json.dumps(curve[-1]), flush=True)
        if v["ndcg_at_10"] > best:
            best, best_epoch = v["ndcg_at_10"], epoch
            best_state = copy.deepcopy(model.lightning_model.state_dict())
            best_valid = v
    train_seconds = time.perf_counter() - t0
    model.lightning_model.load_state_dict(best_state)
    reco = model.recommend(users=users_t, dataset=test_hist, k=10, filter_viewed=True)
    import rectools

    res = {"fit_seconds": train_seconds, "epochs": epoch, "best_epoch": best_epoch, "valid": best_valid,
           "test": hit_ndcg(reco, test_t), "curve": curve, "version": rectools.__version__,
           "config": {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in common.items()}}
    with open(out_path, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
