"""`prepare`: from events.parquet to sequences, leave-last-out and temporal splits, and the MF matrix."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import polars as pl
import scipy.sparse as sp

from recsys_pretrain import schema as S
from recsys_pretrain.config import PrepareConfig
from recsys_pretrain.data import split
from recsys_pretrain.data.interactions import interaction_matrix
from recsys_pretrain.io import atomic_dir, sha256_file, write_json
from recsys_pretrain.vocab import Vocab


def prepare(ingested: str | Path, out: str | Path, cfg: PrepareConfig, force: bool = False) -> dict:
    """Write loo.parquet (each user's training items and leave-last-out targets), train_matrix.npz, vocab.json
    and meta.json (with the counts of the global temporal split at `temporal_cutoff`, which labels use)."""
    t0 = time.perf_counter()
    ingested = Path(ingested)
    events_path = ingested / "events.parquet"
    if not events_path.exists():
        raise FileNotFoundError(f"{events_path}: not found; run `recsys-pretrain ingest` first")
    vocab = Vocab.load(ingested / "vocab.json")
    # Only the columns the splits need: the text columns of a large log would dominate memory.
    events = pl.scan_parquet(events_path).select(S.USER_IDX, S.ITEM_IDX, S.TIMESTAMP, S.EVENT_TYPE)
    inter = split.interactions(events, cfg.sequence_event_types, cfg.collapse_repeats, cfg.first_only)

    with atomic_dir(out, inputs=[ingested], force=force) as stage:
        shutil.copyfile(ingested / "vocab.json", stage / "vocab.json")

        tagged = split.leave_last_out(inter, cfg.min_train_items).collect()
        loo = split.loo_table(tagged.lazy()).collect()
        loo.write_parquet(stage / "loo.parquet")
        train_events = tagged.filter(pl.col(split.SPLIT) == "train")
        matrix = interaction_matrix(train_events, vocab.n_users, vocab.n_items, cfg.event_weights)
        sp.save_npz(stage / "train_matrix.npz", matrix)

        has_time = tagged[S.TIMESTAMP].null_count() == 0 and tagged.height > 0
        temporal = {"available": False, "why": "the log has no timestamps"}
        if has_time:
            cutoff = split.resolve_cutoff(inter, cfg.temporal_cutoff)
            tt = split.temporal_split(tagged.drop(split.SPLIT).lazy(), cutoff).collect()
            train_users = tt.filter(pl.col(split.SPLIT) == "train")[S.USER_IDX].unique()
            train_items = tt.filter(pl.col(split.SPLIT) == "train")[S.ITEM_IDX].unique()
            test = tt.filter(pl.col(split.SPLIT) == "test")
            temporal = {
                "available": True,
                "cutoff": cutoff.isoformat(),
                "train_events": int((tt[split.SPLIT] == "train").sum()),
                "test_events": test.height,
                "test_users_cold": int(test[S.USER_IDX].unique().is_in(train_users.implode()).not_().sum()),
                "test_items_cold": int(test[S.ITEM_IDX].unique().is_in(train_items.implode()).not_().sum()),
            }

        lengths = loo.select(pl.col("train").list.len()).to_series()
        report = json.loads((ingested / "report.json").read_text()) if (ingested / "report.json").exists() else {}
        meta = {
            "dataset": report.get("dataset", ingested.name),
            "source": str(ingested),
            "events_sha256": sha256_file(events_path),
            "n_users": vocab.n_users,
            "n_items": vocab.n_items,
            "n_item_tokens": vocab.n_item_tokens,
            "pad": vocab.pad,
            "mask": vocab.mask,
            "interactions": tagged.height,
            "loo": {
                "users_with_test": int(loo["test"].is_not_null().sum()),
                "train_interactions": train_events.height,
                "train_length_p50": float(lengths.median() or 0),
                "train_length_max": int(lengths.max() or 0),
            },
            "matrix": {"shape": list(matrix.shape), "nnz": int(matrix.nnz)},
            "temporal": temporal,
            "config": asdict(cfg),
        }
        meta["seconds"] = round(time.perf_counter() - t0, 3)
        write_json(stage / "meta.json", meta)
    return meta
