"""Click and purchase labels for fine-tuning, split in time so that nothing leaks:

    pretraining sees events before T1;  fine-tuning labels come from [T1, T2);  test labels from [T2, end).

Click labels: where impressions are logged, an impression followed by a click of the same item within
`click_window_s` is 1 and one without is 0 (true negatives). Where they are not, clicks are positives
and negatives are items the user never touched, sampled by popularity (the report says which).
Purchase labels: 1 when the user bought the item within `purchase_window_s` of the impression or click
(ESMM: conversion is only possible after a click, so y_purchase <= y_click).
"""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl

from recsys_pretrain import schema as S
from recsys_pretrain.config import LabelConfig
from recsys_pretrain.data.split import resolve_cutoff
from recsys_pretrain.io import atomic_dir, write_json

T = "time"
FEATURES = ("log_item_popularity", "category_match", "log_user_activity")


def _outcome(left: pl.DataFrame, events: pl.DataFrame, name: str, window_s: int) -> pl.Series:
    """For each (user, item, time) row of `left`: did `events` hold the same (user, item) within
    [time, time + window]? One as-of join forward in time."""
    right = events.select(S.USER_IDX, S.ITEM_IDX, pl.col(S.TIMESTAMP).alias(name)).sort(name)
    joined = left.with_row_index("_row").sort(T).join_asof(
        right, left_on=T, right_on=name, by=[S.USER_IDX, S.ITEM_IDX], strategy="forward", check_sortedness=False
    ).sort("_row")
    within = (pl.col(name) - pl.col(T)) <= timedelta(seconds=window_s)
    return joined.select(within.fill_null(False)).to_series()


def _impression_labels(later: pl.DataFrame, cfg: LabelConfig) -> pl.DataFrame:
    shown = later.filter(pl.col(S.EVENT_TYPE) == "impression").select(
        S.USER_IDX, S.ITEM_IDX, pl.col(S.TIMESTAMP).alias(T))
    clicks = later.filter(pl.col(S.EVENT_TYPE) == "click")
    buys = later.filter(pl.col(S.EVENT_TYPE) == "purchase")
    y_click = _outcome(shown, clicks, "_click", cfg.click_window_s)
    y_buy = _outcome(shown, buys, "_buy", cfg.purchase_window_s) & y_click
    return shown.with_columns(y_click=y_click.cast(pl.Int8), y_purchase=y_buy.cast(pl.Int8),
                              source=pl.lit("impression"))


def _sampled_labels(events: pl.DataFrame, later: pl.DataFrame, n_items: int, cfg: LabelConfig,
                    t1) -> pl.DataFrame:
    clicks = later.filter(pl.col(S.EVENT_TYPE) == "click").select(
        S.USER_IDX, S.ITEM_IDX, pl.col(S.TIMESTAMP).alias(T))
    buys = later.filter(pl.col(S.EVENT_TYPE) == "purchase")
    pos = clicks.with_columns(y_click=pl.lit(1, pl.Int8),
                              y_purchase=_outcome(clicks, buys, "_buy", cfg.purchase_window_s).cast(pl.Int8),
                              source=pl.lit("click"))
    # Negatives: popularity-sampled (counts before T1, +1 so every item can be drawn) items the user
    # never touched at any time, each at the time of the positive it pairs with.
    before = events.filter(pl.col(S.TIMESTAMP) < t1)
    counts = np.bincount(before[S.ITEM_IDX].to_numpy(), minlength=n_items + 1)[1:].astype(np.float64) + 1.0
    p = counts / counts.sum()
    rng = np.random.default_rng(cfg.seed)
    k = cfg.negatives_per_positive
    users = np.repeat(pos[S.USER_IDX].to_numpy(), k)
    times = np.repeat(pos[T].to_numpy(), k)
    items = rng.choice(n_items, size=len(users), p=p) + 1
    touched = events.select(pl.col(S.USER_IDX).cast(pl.UInt64) * (n_items + 2) + pl.col(S.ITEM_IDX)).to_series()
    key = users.astype(np.uint64) * np.uint64(n_items + 2) + items.astype(np.uint64)
    fresh = ~np.isin(key, touched.unique().to_numpy())
    neg = pl.DataFrame({S.USER_IDX: users[fresh].astype(np.uint32), S.ITEM_IDX: items[fresh].astype(np.uint32),
                        T: pl.Series(times[fresh]).cast(S.TIMESTAMP_DTYPE)})
    neg = neg.with_columns(y_click=pl.lit(0, pl.Int8), y_purchase=pl.lit(0, pl.Int8), source=pl.lit("sampled"))
    return pl.concat([pos, neg]).sort(T, S.USER_IDX, maintain_order=True)


def build_labels(ingested: str | Path, out: str | Path, cfg: LabelConfig, force: bool = False) -> dict:
    """Write out/labels.parquet, out/features.npz, out/pretrain/ (events before T1 + the full vocab,
    ready for `prepare`), and out/labels_report.json."""
    ingested = Path(ingested)
    events = pl.read_parquet(ingested / "events.parquet",
                             columns=[S.USER_IDX, S.ITEM_IDX, S.TIMESTAMP, S.EVENT_TYPE, S.CATEGORY_ID])
    if events[S.TIMESTAMP].null_count():
        raise ValueError(f"{ingested}: labels need timestamps; this log has none")
    t1 = resolve_cutoff(events.lazy(), cfg.pretrain_cutoff)
    t2 = resolve_cutoff(events.lazy(), cfg.test_cutoff)
    if not t1 < t2:
        raise ValueError(f"pretrain_cutoff {t1} must be before test_cutoff {t2}")
    vocab = json.loads((ingested / "vocab.json").read_text())
    n_users, n_items = vocab["n_users"], vocab["n_items"]
    before_t1 = pl.col(S.TIMESTAMP) < pl.lit(t1).cast(S.TIMESTAMP_DTYPE)
    later = events.filter(~before_t1)
    has_impressions = bool((events[S.EVENT_TYPE] == "impression").any())
    labels = (_impression_labels(later, cfg) if has_impressions
              else _sampled_labels(events, later, n_items, cfg, t1))
    labels = labels.with_columns(
        split=pl.when(pl.col(T) < pl.lit(t2).cast(S.TIMESTAMP_DTYPE)).then(pl.lit("finetune")).otherwise(pl.lit("test"))
    )

    # Features known at T1: item popularity, the user's activity, and whether the item is in the user's
    # most frequent category (all from events before T1 only).
    before = events.filter(before_t1 & (pl.col(S.EVENT_TYPE) != "impression"))
    item_pop = np.bincount(before[S.ITEM_IDX].to_numpy(), minlength=n_items + 1).astype(np.float32)
    user_act = np.bincount(before[S.USER_IDX].to_numpy(), minlength=n_users).astype(np.float32)
    cat_codes = events[S.CATEGORY_ID].cast(pl.Categorical).to_physical().fill_null(-1).cast(pl.Int64).to_numpy()
    item_cat = np.full(n_items + 1, -1, dtype=np.int64)
    item_cat[events[S.ITEM_IDX].to_numpy()] = cat_codes  # one category per item (the last seen)
    user_cat = np.full(n_users, -2, dtype=np.int64)
    fav = (before.with_columns(cat=pl.Series(item_cat[before[S.ITEM_IDX].to_numpy()]))
           .filter(pl.col("cat") >= 0).group_by(S.USER_IDX, "cat").len()
           .sort("len", descending=True).unique(S.USER_IDX, keep="first"))
    user_cat[fav[S.USER_IDX].to_numpy()] = fav["cat"].to_numpy()

    with atomic_dir(out, inputs=[ingested], force=force) as stage:
        pre = stage / "pretrain"
        pre.mkdir()
        pl.scan_parquet(ingested / "events.parquet").filter(before_t1).sink_parquet(pre / "events.parquet")
        shutil.copyfile(ingested / "vocab.json", pre / "vocab.json")
        name = json.loads((ingested / "report.json").read_text()).get("dataset", ingested.name) \
            if (ingested / "report.json").exists() else ingested.name
        write_json(pre / "report.json", {"dataset": f"{name}-before-T1"})
        labels.write_parquet(stage / "labels.parquet")
        np.savez(stage / "features.npz", item_pop=item_pop, user_act=user_act, item_cat=item_cat, user_cat=user_cat)
        report = {"dataset": name, "t1": t1.isoformat(), "t2": t2.isoformat(),
                  "negatives": "impressions (logged, true negatives)" if has_impressions else
                  f"sampled: {cfg.negatives_per_positive} per click, by popularity before T1, never-touched items",
                  "splits": {}}
        for part in ("finetune", "test"):
            d = labels.filter(pl.col("split") == part)
            clicked = d.filter(pl.col("y_click") == 1)
            report["splits"][part] = {
                "rows": d.height, "users": d[S.USER_IDX].n_unique(),
                "click_rate": float(d["y_click"].mean() or 0), "purchase_rate": float(d["y_purchase"].mean() or 0),
                "purchase_given_click": float(clicked["y_purchase"].mean() or 0) if clicked.height else 0.0,
                "by_source": dict(zip(*d.group_by("source").len().sort("source").to_dict(as_series=False).values(),
                                      strict=True)),
            }
        report["pretrain_events"] = int(events.filter(before_t1).height)
        write_json(stage / "labels_report.json", report)
    return report


def features(labels: pl.DataFrame, feats: dict) -> np.ndarray:
    """(n, 3) float32: log1p item popularity, category match, log1p user activity (all known at T1)."""
    u, i = labels[S.USER_IDX].to_numpy(), labels[S.ITEM_IDX].to_numpy()
    match = (feats["item_cat"][i] == feats["user_cat"][u]) & (feats["item_cat"][i] >= 0)
    return np.stack([np.log1p(feats["item_pop"][i]), match.astype(np.float32), np.log1p(feats["user_act"][u])],
                    axis=1).astype(np.float32)
