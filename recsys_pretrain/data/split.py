"""Per-user sequences and leak-free splits, as pure Polars transforms of the ingested events.

Leave-last-out: per user, the last interaction is the test target, the one before it the validation
target, and the rest is training. Temporal: every event before a global cutoff time trains, the rest
tests. In both, a held-out event never appears among the training events.
"""

from __future__ import annotations

from datetime import datetime

import polars as pl

from recsys_pretrain import schema as S

POS = "pos"  # 0-based position of an event in its user's sequence
LEN = "seq_len"
SPLIT = "split"  # "train" | "valid" | "test"
SPLIT_DTYPE = pl.Enum(["train", "valid", "test"])  # one byte a row, not a string


def interactions(events: pl.LazyFrame, event_types: tuple[str, ...], collapse_repeats: bool,
                 first_only: bool = False) -> pl.LazyFrame:
    """Events that count as interactions, in user then time order, with their position in the sequence.
    `first_only`: each user's first interaction with an item only (later repeats dropped)."""
    unknown = set(event_types) - set(S.EVENT_TYPES)
    if unknown:
        raise ValueError(f"sequence_event_types: unknown event types {sorted(unknown)}; known: {S.EVENT_TYPES}")
    lf = events.filter(pl.col(S.EVENT_TYPE).is_in(list(event_types)))
    if collapse_repeats:
        same = (pl.col(S.ITEM_IDX) == pl.col(S.ITEM_IDX).shift(1)) & (
            pl.col(S.USER_IDX) == pl.col(S.USER_IDX).shift(1)
        )
        lf = lf.filter(~same.fill_null(False))
    if first_only:
        lf = lf.filter(pl.int_range(pl.len()).over(S.USER_IDX, S.ITEM_IDX) == 0)
    return lf.with_columns(
        pl.int_range(pl.len(), dtype=pl.UInt32).over(S.USER_IDX).alias(POS),
        pl.len().over(S.USER_IDX).cast(pl.UInt32).alias(LEN),
    )


def leave_last_out(inter: pl.LazyFrame, min_train_items: int = 1) -> pl.LazyFrame:
    """Tag each interaction train / valid / test. Users too short to hold out two items stay all-train."""
    holds_out = pl.col(LEN) >= min_train_items + 2
    split = (
        pl.when(holds_out & (pl.col(POS) == pl.col(LEN) - 1)).then(pl.lit("test"))
        .when(holds_out & (pl.col(POS) == pl.col(LEN) - 2)).then(pl.lit("valid"))
        .otherwise(pl.lit("train"))
    )
    return inter.with_columns(split.cast(SPLIT_DTYPE).alias(SPLIT))


def loo_table(tagged: pl.LazyFrame) -> pl.LazyFrame:
    """One row per user: training items in order, the validation target and the test target."""
    return (
        tagged.group_by(S.USER_IDX, maintain_order=True)
        .agg(
            pl.col(S.ITEM_IDX).filter(pl.col(SPLIT) == "train").alias("train"),
            pl.col(S.TIMESTAMP).filter(pl.col(SPLIT) == "train").alias("train_time"),
            pl.col(S.ITEM_IDX).filter(pl.col(SPLIT) == "valid").first().alias("valid"),
            pl.col(S.ITEM_IDX).filter(pl.col(SPLIT) == "test").first().alias("test"),
        )
        .sort(S.USER_IDX)
    )


def sequences(inter: pl.LazyFrame) -> pl.LazyFrame:
    """One row per user: all interaction items and times in order."""
    return (
        inter.group_by(S.USER_IDX, maintain_order=True)
        .agg(pl.col(S.ITEM_IDX).alias("items"), pl.col(S.TIMESTAMP).alias("times"),
             pl.col(S.EVENT_TYPE).alias("events"))
        .sort(S.USER_IDX)
    )


def resolve_cutoff(events: pl.LazyFrame, cutoff: str | float) -> datetime:
    """An ISO time, or a quantile in (0, 1) of the event times."""
    if isinstance(cutoff, float) or (isinstance(cutoff, str) and cutoff.replace(".", "", 1).isdigit()):
        q = float(cutoff)
        if not 0.0 < q < 1.0:
            raise ValueError(f"temporal_cutoff quantile must be in (0, 1), got {q}")
        value = events.select(pl.col(S.TIMESTAMP).quantile(q, "nearest")).collect().item()
        if value is None:
            raise ValueError("temporal split needs timestamps; this log has none (e.g. the sasrec format)")
        return value
    out = datetime.fromisoformat(cutoff)
    if out.tzinfo is None:
        raise ValueError(f"temporal_cutoff {cutoff!r} needs a time zone, e.g. {cutoff}+00:00")
    return out


def temporal_split(inter: pl.LazyFrame, cutoff: datetime) -> pl.LazyFrame:
    """Tag each interaction train (before the cutoff) or test (at or after it)."""
    before = pl.col(S.TIMESTAMP) < pl.lit(cutoff).cast(S.TIMESTAMP_DTYPE)
    return inter.with_columns(
        pl.when(before).then(pl.lit("train")).otherwise(pl.lit("test")).cast(SPLIT_DTYPE).alias(SPLIT))
