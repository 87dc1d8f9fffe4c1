import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from recsys_pretrain import schema as S
from recsys_pretrain.config import IngestConfig, PrepareConfig
from recsys_pretrain.data import split
from recsys_pretrain.data.ingest import ingest
from recsys_pretrain.data.prepare import prepare

HEADER = "user_id,item_id,timestamp,event_type\n"


@pytest.fixture
def log(write, tmp_path):
    """Three users; u1 re-visits item a, u3 is too short to hold anything out."""
    rows = [
        ("u1", "a", 1, "click"), ("u1", "b", 2, "impression"), ("u1", "b", 3, "click"), ("u1", "c", 4, "purchase"),
        ("u1", "a", 5, "click"), ("u1", "d", 6, "add_to_cart"),
        ("u2", "b", 2, "click"), ("u2", "c", 7, "click"), ("u2", "e", 8, "purchase"), ("u2", "a", 9, "click"),
        ("u3", "e", 3, "click"),
    ]
    body = "".join(f"{u},{i},{1700000000 + t * 3600},{e}\n" for u, i, t, e in rows)
    src = write("log.csv", HEADER + body)
    ingest([src], tmp_path / "ing", IngestConfig())
    return tmp_path / "ing"


def _sequences(ingested, cfg: PrepareConfig) -> pl.DataFrame:
    """Every user's whole interaction sequence, as prepare reads it: what the splits are checked against."""
    events = pl.scan_parquet(ingested / "events.parquet")
    inter = split.interactions(events, cfg.sequence_event_types, cfg.collapse_repeats, cfg.first_only)
    return split.sequences(inter).collect()


def _items(vocab_items, idx):
    return [vocab_items[i - 1] for i in idx]


def test_leave_last_out_holds_out_the_last_two_and_never_leaks(log, tmp_path):
    meta = prepare(log, tmp_path / "prep", PrepareConfig(temporal_cutoff=0.5))
    loo = pl.read_parquet(tmp_path / "prep" / "loo.parquet")
    items = ["a", "b", "c", "d", "e"]
    u1, u2, u3 = loo.sort(S.USER_IDX).iter_rows(named=True)
    # impressions are exposure, not interactions: u1's sequence is a b c a d
    assert _items(items, u1["train"]) == ["a", "b", "c"] and items[u1["valid"] - 1] == "a"
    assert items[u1["test"] - 1] == "d"
    assert _items(items, u2["train"]) == ["b", "c"] and items[u2["valid"] - 1] == "e"
    assert items[u2["test"] - 1] == "a"
    assert u3["valid"] is None and u3["test"] is None and _items(items, u3["train"]) == ["e"]
    assert meta["loo"]["users_with_test"] == 2

    # the matrix is built from training events only: u2's held-out a and e are absent, u1's earlier a stays
    m = sp.load_npz(tmp_path / "prep" / "train_matrix.npz")
    assert m.shape == (3, 6)  # column 0 is padding
    assert m[1, 1] == 0 and m[1, 5] == 0 and m[1, 2] == 1 and m[1, 3] == 1
    assert m[0, 1] == 1 and m[0, 4] == 0  # u1: a once in training (the second a is validation), d held out
    assert m[0, 3] == 4.0  # purchase weight
    assert m[:, 0].nnz == 0


def test_loo_training_times_precede_held_out_times(log, tmp_path):
    prepare(log, tmp_path / "prep", PrepareConfig())
    seq = _sequences(log, PrepareConfig())
    loo = pl.read_parquet(tmp_path / "prep" / "loo.parquet")
    for s, row in zip(seq.iter_rows(named=True), loo.iter_rows(named=True), strict=True):
        if row["test"] is None:
            continue
        assert s["items"][-1] == row["test"] and s["items"][-2] == row["valid"]
        assert s["items"][:-2] == row["train"]
        assert max(row["train_time"]) <= s["times"][-2] <= s["times"][-1]


def test_temporal_split_by_cutoff(log, tmp_path):
    meta = prepare(log, tmp_path / "prep", PrepareConfig(temporal_cutoff="2023-11-15T03:00:00+00:00"))
    cutoff = pl.Series([meta["temporal"]["cutoff"]]).str.to_datetime(time_zone="UTC")[0]
    seq = _sequences(log, PrepareConfig()).explode("items", "times", "events")
    tt = split.temporal_split(seq.rename({"items": S.ITEM_IDX, "times": S.TIMESTAMP}).lazy(), cutoff).collect()
    train, test = tt.filter(pl.col(split.SPLIT) == "train"), tt.filter(pl.col(split.SPLIT) == "test")
    assert train[S.TIMESTAMP].max() < cutoff <= test[S.TIMESTAMP].min()
    assert train.height + test.height == meta["interactions"]
    assert meta["temporal"]["train_events"] == train.height and meta["temporal"]["test_events"] == test.height


def test_temporal_cutoff_rejects_naive_times_and_bad_quantiles(log, tmp_path):
    with pytest.raises(ValueError, match="time zone"):
        prepare(log, tmp_path / "p1", PrepareConfig(temporal_cutoff="2023-11-15T03:00:00"))
    with pytest.raises(ValueError, match="quantile"):
        prepare(log, tmp_path / "p2", PrepareConfig(temporal_cutoff=1.5))


def test_collapse_repeats_and_custom_weights(write, tmp_path):
    body = "".join(f"u,{i},{1700000000 + t},click\n" for t, i in enumerate("aabbbca"))
    ingest([write("log.csv", HEADER + body)], tmp_path / "ing", IngestConfig())
    cfg = PrepareConfig(collapse_repeats=True, event_weights={"click": 0.5})
    prepare(tmp_path / "ing", tmp_path / "prep", cfg)
    seq = _sequences(tmp_path / "ing", cfg)
    assert seq["items"].to_list() == [[1, 2, 3, 1]]
    m = sp.load_npz(tmp_path / "prep" / "train_matrix.npz").toarray()
    np.testing.assert_allclose(m, [[0, 0.5, 0.5, 0]])  # a b | c (valid) a (test)


def test_sasrec_logs_have_no_temporal_split(write, tmp_path):
    ingest([write("s.txt", "1 1\n1 2\n1 3\n1 4\n")], tmp_path / "ing", IngestConfig(format="sasrec"))
    meta = prepare(tmp_path / "ing", tmp_path / "prep", PrepareConfig())
    assert meta["temporal"]["available"] is False
    loo = pl.read_parquet(tmp_path / "prep" / "loo.parquet")
    assert loo.row(0, named=True)["train"] == [1, 2] and loo["test"].item() == 4


def test_first_only_keeps_each_users_first_interaction_with_an_item(write, tmp_path):
    """Repeats dropped: every held-out target is an item the user had not interacted with before."""
    import polars as pl

    from recsys_pretrain.config import IngestConfig, PrepareConfig
    from recsys_pretrain.data.ingest import ingest
    from recsys_pretrain.data.prepare import prepare

    rows = ["user_id,item_id,timestamp,event_type"] + [
        f"u1,{i},{1700000000 + t},click" for t, i in enumerate(["a", "b", "a", "c", "b", "d", "a"])]
    write("e.csv", "\n".join(rows) + "\n")
    ingest([tmp_path / "e.csv"], tmp_path / "ing", IngestConfig())
    prepare(tmp_path / "ing", tmp_path / "keep", PrepareConfig())
    prepare(tmp_path / "ing", tmp_path / "first", PrepareConfig(first_only=True))
    import json

    items = json.loads((tmp_path / "ing" / "vocab.json").read_text())["items"]
    name = {i + 1: v for i, v in enumerate(items)}
    keep = pl.read_parquet(tmp_path / "keep" / "loo.parquet").row(0, named=True)
    first = pl.read_parquet(tmp_path / "first" / "loo.parquet").row(0, named=True)
    assert name[keep["test"]] == "a" and name[keep["valid"]] == "d"  # a repeat as the target
    assert [name[i] for i in first["train"]] == ["a", "b"]
    assert (name[first["valid"]], name[first["test"]]) == ("c", "d")
