"""Tests for the synthetic behaviour-log generator: format, determinism, and the signal it must carry."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime
from functools import cache
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from recsys_pretrain.data.synthetic import (
    COLUMNS,
    EVENT_TYPES,
    SCHEMA,
    SESSION_STRIDE,
    SynthConfig,
    generate,
    ground_truth,
    true_affinity,
    write_synthetic,
)

SMALL = SynthConfig(n_users=400, n_items=200, n_categories=10, events_per_user=60.0, seed=3)


def frame(cfg: SynthConfig, chunk_users: int = 20_000) -> pl.DataFrame:
    return pl.concat(list(generate(cfg, chunk_users)))


@cache
def small() -> pl.DataFrame:
    return frame(SMALL)


def check_invariants(df: pl.DataFrame, cfg: SynthConfig) -> None:
    """Format and funnel rules every generated log must satisfy."""
    assert df.columns == list(COLUMNS)
    assert dict(df.schema) == SCHEMA
    assert set(df["event_type"].unique()) <= set(EVENT_TYPES)
    assert df.null_count().drop("value").sum_horizontal().item() == 0

    start = int(datetime.fromisoformat(cfg.start).timestamp())
    assert df["timestamp"].min() >= start
    assert df["timestamp"].max() <= start + cfg.n_days * 86_400
    assert df["user_id"].min() >= 1 and df["user_id"].max() <= cfg.n_users
    assert df["item_id"].min() >= 1 and df["item_id"].max() <= cfg.n_items
    assert df.equals(df.sort("user_id", "timestamp", maintain_order=True)), "not ordered by user then time"

    # value is set exactly on purchases, and is the item's price
    is_buy = df["event_type"] == "purchase"
    assert (df["value"].is_not_null() == is_buy).all()
    truth = ground_truth(cfg)
    bought = df.filter(is_buy)
    assert np.array_equal(bought["value"].to_numpy(), truth["item_price"][bought["item_id"].to_numpy() - 1])
    assert np.array_equal(df["category_id"].to_numpy(), truth["item_category"][df["item_id"].to_numpy() - 1])

    # session ids belong to one user and cover a contiguous run of that user's rows
    assert ((df["session_id"] // SESSION_STRIDE) == df["user_id"]).all()
    runs = df["session_id"].rle_id()
    assert runs.n_unique() == df["session_id"].n_unique()

    # every add_to_cart / purchase comes after a click on the same item by the same user,
    # and every purchase after an add_to_cart
    rows = df.with_row_index("row")
    for event, needs in (("add_to_cart", "click"), ("purchase", "click"), ("purchase", "add_to_cart")):
        first_need = (
            rows.filter(pl.col("event_type") == needs)
            .group_by("user_id", "item_id")
            .agg(pl.col("row").min().alias("first"))
        )
        later = rows.filter(pl.col("event_type") == event).join(
            first_need, on=["user_id", "item_id"], how="left"
        )
        assert (later["first"].is_not_null() & (later["first"] < later["row"])).all(), (
            f"{event} before {needs}"
        )


def test_schema_and_invariants():
    df = small()
    check_invariants(df, SMALL)
    assert set(df["event_type"].unique()) == set(EVENT_TYPES)
    assert df["user_id"].n_unique() == SMALL.n_users
    # events_per_user is the mean over users of all logged events
    assert df.height / SMALL.n_users == pytest.approx(SMALL.events_per_user, rel=0.15)
    # impressions dominate, clicks follow, the funnel narrows
    counts = dict(df["event_type"].value_counts().iter_rows())
    assert counts["impression"] > counts["click"] > counts["add_to_cart"] >= counts["purchase"] > 0


def test_sessions_span_days_and_are_tight_inside():
    df = small()
    per_user = df.group_by("user_id").agg(pl.col("session_id").n_unique().alias("n"))
    assert per_user["n"].mean() >= 2
    gaps = df.with_columns(
        gap=pl.col("timestamp").diff().over("user_id"),
        new=pl.col("session_id") != pl.col("session_id").shift().over("user_id"),
    ).drop_nulls("gap")
    inside = gaps.filter(~pl.col("new"))["gap"]
    between = gaps.filter(pl.col("new"))["gap"]
    assert inside.max() < 3600 and inside.median() < 300  # seconds to minutes
    assert between.min() >= 1800 and between.median() > 86_400  # sessions spread over days
    days = (df["timestamp"].max() - df["timestamp"].min()) / 86_400
    assert days > 0.9 * SMALL.n_days


def test_deterministic_and_independent_of_chunking():
    df = small()
    assert_frame_equal(frame(SMALL, chunk_users=57), df)
    other = frame(SynthConfig(**{**SMALL.__dict__, "seed": 4}))
    assert not other.equals(df)
    # the first users do not change when more users are added
    more = frame(SynthConfig(**{**SMALL.__dict__, "n_users": 500}))
    assert_frame_equal(more.filter(pl.col("user_id") <= SMALL.n_users), df)


def test_progress_reports_every_user():
    done = []
    chunks = list(generate(SMALL, chunk_users=150, progress=done.append))
    assert done == [150, 150, 100]
    assert [c["user_id"].n_unique() for c in chunks] == done


def test_purchase_rate_rises_with_true_affinity():
    df = small()
    truth = ground_truth(SMALL)
    pairs = (
        df.filter(pl.col("event_type") == "click")
        .select("user_id", "item_id")
        .unique()
        .join(
            df.filter(pl.col("event_type") == "purchase").select("user_id", "item_id").unique(),
            on=["user_id", "item_id"],
            how="left",
            coalesce=False,
        )
        .with_columns(bought=pl.col("item_id_right").is_not_null())
    )
    aff = true_affinity(truth, pairs["user_id"].to_numpy(), pairs["item_id"].to_numpy())
    bought = pairs["bought"].to_numpy()
    low, high = np.quantile(aff, [1 / 3, 2 / 3])
    bottom, top = bought[aff <= low].mean(), bought[aff >= high].mean()
    assert top > bottom + 0.05 and top > 3 * bottom, (bottom, top)


def test_clicked_items_have_higher_affinity_than_shown_ones():
    df = small()
    # an impression was clicked if the user's next click is on the same item
    shown = (
        df.with_columns(
            next_click=pl.when(pl.col("event_type") == "click")
            .then(pl.col("item_id"))
            .fill_null(strategy="backward")
            .over("user_id")
        )
        .filter((pl.col("event_type") == "impression") & pl.col("next_click").is_not_null())
        .with_columns(clicked=pl.col("item_id") == pl.col("next_click"))
    )
    truth = ground_truth(SMALL)
    aff = true_affinity(truth, shown["user_id"].to_numpy(), shown["item_id"].to_numpy())
    clicked = shown["clicked"].to_numpy()
    assert 0.2 < clicked.mean() < 0.35  # about one click per slate of 4
    assert aff[clicked].mean() > aff[~clicked].mean() + 0.5


def next_click_hit_rates(df: pl.DataFrame, k: int = 10) -> tuple[float, float]:
    """Hit-rate@k on each user's last 20% of clicks for most-popular and a first-order transition model,
    both fitted on the first 80% of each user's clicks."""
    seqs = df.filter(pl.col("event_type") == "click").group_by("user_id", maintain_order=True).agg("item_id")
    popularity: Counter = Counter()
    transitions: dict[int, Counter] = defaultdict(Counter)
    tests = []
    for seq in seqs["item_id"].to_list():
        cut = int(0.8 * len(seq))
        popularity.update(seq[:cut])
        for prev, nxt in zip(seq[: cut - 1], seq[1:cut], strict=True):
            transitions[prev][nxt] += 1
        tests += [(seq[p - 1], seq[p]) for p in range(max(cut, 1), len(seq))]
    top = [item for item, _ in popularity.most_common(k)]
    pop_hits = seq_hits = 0
    for prev, target in tests:
        guess = [item for item, _ in transitions[prev].most_common(k)]
        guess += [item for item in top if item not in guess][: k - len(guess)]  # pad with popular items
        pop_hits += target in top
        seq_hits += target in guess
    assert len(tests) > 500
    return pop_hits / len(tests), seq_hits / len(tests)


def test_transition_model_beats_popularity():
    pop, seq = next_click_hit_rates(small())
    assert seq >= 1.5 * pop, (pop, seq)


def test_transition_edge_comes_from_p_sequential():
    # control: without sequential clicks the last item still hints at the user's taste, but the
    # transition model's clear edge is gone
    pop, seq = next_click_hit_rates(frame(SynthConfig(**{**SMALL.__dict__, "p_sequential": 0.0})))
    assert seq < 1.3 * pop, (pop, seq)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_write_synthetic_round_trips(tmp_path: Path, fmt: str):
    cfg = SynthConfig(**{**SMALL.__dict__, "n_users": 120})
    out, truth = tmp_path / f"log.{fmt}", tmp_path / "truth.npz"
    summary = write_synthetic(cfg, out, fmt=fmt, truth=truth, chunk_users=50)

    back = pl.read_csv(out, schema=SCHEMA) if fmt == "csv" else pl.read_parquet(out)
    expected = frame(cfg)
    assert_frame_equal(back, expected)
    assert summary["rows"] == expected.height
    assert summary["rows_per_event_type"] == {
        t: int((expected["event_type"] == t).sum()) for t in EVENT_TYPES
    }
    assert summary["users"] == cfg.n_users
    assert summary["items"] == expected["item_id"].n_unique()
    assert summary["path"] == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, truth.name])  # no temp files left

    with np.load(truth) as f:
        for key in ("user_vecs", "item_vecs", "item_bias", "item_category", "item_price", "successors"):
            assert key in f.files
        assert f["user_vecs"].shape == (cfg.n_users, cfg.dim)
        assert f["successors"].shape == (cfg.n_items, cfg.n_successors)
        assert float(f["funnel_slope"]) == cfg.funnel_slope
    users, items = expected["user_id"].to_numpy(), expected["item_id"].to_numpy()
    assert np.allclose(true_affinity(truth, users, items), true_affinity(ground_truth(cfg), users, items))

    # same seed, byte-identical file
    again = tmp_path / "again" / out.name
    write_synthetic(cfg, again, fmt=fmt)
    if fmt == "csv":
        assert again.read_bytes() == out.read_bytes()
    else:
        assert_frame_equal(pl.read_parquet(again), back)


def test_write_synthetic_rejects_unknown_format(tmp_path: Path):
    with pytest.raises(ValueError, match="fmt"):
        write_synthetic(SMALL, tmp_path / "x.json", fmt="json")
    assert not any(tmp_path.iterdir())


def test_config_is_validated():
    with pytest.raises(ValueError, match="n_categories"):
        SynthConfig(n_items=5, n_categories=10)
    with pytest.raises(ValueError, match="p_sequential"):
        SynthConfig(p_sequential=1.5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_users=st.integers(1, 40),
    n_items=st.integers(1, 30),
    n_categories=st.integers(1, 30),
    events_per_user=st.floats(1.0, 40.0),
    impressions_per_step=st.integers(1, 6),
    p_sequential=st.floats(0.0, 1.0),
    n_successors=st.integers(1, 4),
    chunk_users=st.integers(1, 50),
    seed=st.integers(0, 2**32 - 1),
)
def test_invariants_hold_for_any_config(n_categories, n_items, chunk_users, **kw):
    cfg = SynthConfig(n_items=n_items, n_categories=min(n_categories, n_items), n_days=2, **kw)
    df = frame(cfg, chunk_users)
    check_invariants(df, cfg)
    assert df["user_id"].n_unique() == cfg.n_users  # everyone logs at least one event
    assert_frame_equal(df, frame(cfg))
