"""Partitioned, incremental ingest: hive partitions by day, an append-only vocabulary, the same events as the
monolithic ingest, and the flow's mapping of days on a Dask LocalCluster."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import polars as pl
import pytest

from recsys_pretrain import schema as S
from recsys_pretrain.config import IngestConfig, PrepareConfig
from recsys_pretrain.data import partitions as P
from recsys_pretrain.data.ingest import ingest
from recsys_pretrain.data.prepare import prepare
from recsys_pretrain.data.synthetic import SynthConfig, write_synthetic
from recsys_pretrain.vocab import Vocab
from tests.conftest import ROOT

CFG = IngestConfig(format="generic", id_type="int")
RAW = ["user_id", "item_id", "timestamp", "event_type"]


@pytest.fixture(scope="module")
def days(tmp_path_factory) -> list[str]:
    """Five days of a generated log, one CSV a day, with an exact repeat across a day boundary (day 1's first
    row again in day 2) and two bad rows (day 3)."""
    tmp = tmp_path_factory.mktemp("log")
    write_synthetic(SynthConfig(n_users=150, n_items=90, events_per_user=30, n_days=5, seed=3), tmp / "log.csv")
    files = P.split_by_day(tmp / "log.csv", tmp / "raw")
    assert len(files) == 5
    first = Path(files[0]).read_text().splitlines()[1]
    with open(files[1], "a") as fh:
        fh.write(first + "\n")
    with open(files[2], "a") as fh:
        fh.write("notanumber,5,1704100000,click,,,\n3,7,1704100000,teleport,,,\n")
    return files


def _ingest_nights(files: list[str], store: Path, cfg: IngestConfig = CFG) -> list[dict]:
    states = [P.ingest_partition(day, fs, store, cfg) for day, fs in P.plan(files, store, cfg).items()]
    P.update_vocab(store, "int")
    return states


def _loo_raw(prepared: Path) -> pl.DataFrame:
    """The leave-last-out table in raw ids (indices differ when k-core drops ids the append-only vocab keeps)."""
    v = Vocab.load(prepared / "vocab.json")
    loo = pl.read_parquet(prepared / "loo.parquet")
    items = pl.DataFrame({"i": pl.int_range(1, v.n_items + 1, eager=True, dtype=pl.UInt32), "raw": v.items})

    def raw(col):
        return loo.select(S.USER_IDX, pl.col(col)).join(items, left_on=col, right_on="i", how="left")["raw"]

    train = loo.select(S.USER_IDX, pl.col("train")).explode("train").join(
        items, left_on="train", right_on="i", how="left", maintain_order="left").group_by(
        S.USER_IDX, maintain_order=True).agg(pl.col("raw"))["raw"]
    return pl.DataFrame({"user": v.users.gather(loo[S.USER_IDX].cast(pl.Int64)), "train": train,
                         "valid": raw("valid"), "test": raw("test")}).sort("user")


@pytest.mark.parametrize("kcore,ranges", [(0, False), (4, False), (0, True), (4, True)])
def test_partitioned_equals_monolithic_row_for_row(days, tmp_path, kcore, ranges):
    cfg = dataclasses.replace(CFG, min_user_events=kcore, min_item_events=kcore)
    states = _ingest_nights(days, tmp_path / "store", cfg)
    if ranges:  # the window combined one user range at a time (as a window beyond memory would be)
        cfg = dataclasses.replace(cfg, in_memory_rows=100, partition_rows=1500)
    for s in states:  # every row of every day accounted for
        r = s["report"]
        assert r["rows_read"] == r["rows_accepted"] + r["rows_quarantined"] + r["rows_duplicate"]
    assert states[2]["report"]["quarantine_by_reason"] == {"bad_user_id": 1, "unknown_event_type": 1}
    assert pl.read_parquet(P.quarantine_path(tmp_path / "store", states[2]["day"])).height == 2

    view = P.combine(tmp_path / "store", tmp_path / "view", cfg)
    assert (view["user_ranges"] > 2) == ranges
    mono = ingest(days, tmp_path / "mono", cfg).report
    assert view["rows_duplicate_across_partitions"] == 1  # the repeat across the day boundary
    for k in ("rows_read", "rows_accepted", "rows_quarantined", "rows_duplicate", "kcore"):
        assert view[k] == mono[k], k
    a, b = pl.read_parquet(tmp_path / "view" / "events.parquet"), pl.read_parquet(tmp_path / "mono" / "events.parquet")
    assert a.select(S.CANONICAL_COLUMNS).equals(b.select(S.CANONICAL_COLUMNS))  # raw rows, row for row
    if kcore == 0:  # nothing dropped: the append-only vocabulary of one night is the sorted one
        assert a.equals(b)
    else:  # k-core removed ids the append-only vocabulary keeps: the same rows under stable indices
        assert view["kcore"]["rows_removed"] > 0 and view["users"] + view["items"] > mono["users"] + mono["items"]
        v = Vocab.load(tmp_path / "view")
        assert v.user_ids(a[S.USER_IDX].to_numpy()) == a[S.USER_ID].to_list()
    for name in ("view", "mono"):
        prepare(tmp_path / name, tmp_path / f"{name}-prepared", PrepareConfig())
    assert _loo_raw(tmp_path / "view-prepared").equals(_loo_raw(tmp_path / "mono-prepared"))


def test_three_nights_append_to_the_vocabulary(days, tmp_path):
    store = tmp_path / "store"
    nights = [days[:2], days[:3], days]  # each night delivers the days so far (old days unchanged)
    vocabs, ingested = [], []
    for files in nights:
        ingested.append([s["day"] for s in _ingest_nights(files, store)])
        vocabs.append(Vocab.load(store / "vocab.json"))
    assert [len(d) for d in ingested] == [2, 1, 2]  # only the days not ingested yet
    for old, new in zip(vocabs, vocabs[1:], strict=False):
        assert new.users[: old.n_users].equals(old.users) and new.items[: old.n_items].equals(old.items)
        assert new.n_items >= old.n_items and new.n_users >= old.n_users
        # a known id keeps its index; an id first seen tonight comes after every known one
        assert (new.item_index(old.items) == old.item_index(old.items)).all()
        assert (new.user_index(old.users) == old.user_index(old.users)).all()
        assert new.n_items > old.n_items or new.n_users > old.n_users
    final = vocabs[-1]
    assert not final.users.is_sorted()  # appended, not re-sorted
    assert final.items.n_unique() == final.n_items and final.users.n_unique() == final.n_users
    P.combine(store, tmp_path / "view", CFG)
    ev = pl.read_parquet(tmp_path / "view" / "events.parquet")
    assert final.item_ids(ev[S.ITEM_IDX].to_numpy()) == ev[S.ITEM_ID].to_list()
    assert final.user_ids(ev[S.USER_IDX].to_numpy()) == ev[S.USER_ID].to_list()
    assert set(ev[S.ITEM_ID].unique()) == set(final.items)


def test_a_changed_day_is_ingested_again_and_the_others_are_untouched(days, tmp_path):
    files = [str(tmp_path / "raw" / Path(f).parent.name / "events.csv") for f in days[:3]]
    for src, dst in zip(days, files, strict=False):
        Path(dst).parent.mkdir(parents=True)
        Path(dst).write_bytes(Path(src).read_bytes())
    store = tmp_path / "store"
    _ingest_nights(files, store)
    day = [P.day_of(f) for f in files]

    def stamps():
        return {(d, k): (p.stat().st_ino, p.stat().st_mtime_ns) for d in day
                for k, p in (("events", P.events_path(store, d)), ("quarantine", P.quarantine_path(store, d)))}

    before = stamps()
    assert P.plan(files, store, CFG) == {}  # the same bytes: nothing to do
    assert P.ingest_partition(day[1], [files[1]], store, CFG)["skipped"]
    with open(files[1], "a") as fh:  # a late row arrives for day 2
        fh.write("999999,5,1704150000,click,,,\n")
    todo = P.plan(files, store, CFG)
    assert list(todo) == [day[1]]
    state = P.ingest_partition(day[1], todo[day[1]], store, CFG)
    assert not state["skipped"]
    after = stamps()
    for d in (day[0], day[2]):
        for k in ("events", "quarantine"):
            assert after[(d, k)] == before[(d, k)], (d, k)
    assert after[(day[1], "events")] != before[(day[1], "events")]
    assert 999999 in pl.read_parquet(P.events_path(store, day[1]))[S.USER_ID].to_list()
    old_users = Vocab.load(store / "vocab.json").users
    v = P.update_vocab(store, "int")
    assert v.users[:-1].equals(old_users) and v.users[-1] == 999999
    assert not list(store.glob(".work-*"))  # no work directory left behind


def test_retention_drops_old_days_from_training_and_deletes_only_when_asked(days, tmp_path):
    store = tmp_path / "store"
    _ingest_nights(days, store)
    all_days = P.window(store)
    assert P.window(store, 2) == all_days[-2:]
    rep = P.combine(store, tmp_path / "view", CFG, P.window(store, 2))
    assert rep["partitions"] == all_days[-2:]
    assert events_days(tmp_path / "view") <= set(all_days[-2:])
    assert all(P.events_path(store, d).exists() for d in all_days)  # kept on disk
    n_items = Vocab.load(store / "vocab.json").n_items
    assert P.drop_old(store, 2) == all_days[:-2]
    assert not P.events_path(store, all_days[0]).exists() and P.window(store) == all_days[-2:]
    assert P.update_vocab(store, "int").n_items == n_items  # ids are never removed


def events_days(ingested: Path) -> set[str]:
    ts = pl.read_parquet(ingested / "events.parquet")[S.TIMESTAMP]
    return set(ts.dt.date().cast(pl.String).unique().to_list())


def test_inputs_must_name_their_day(tmp_path):
    assert P.day_of("logs/date=2024-03-09/part.csv") == "2024-03-09"
    assert P.day_of("logs/events-2024-03-09.csv.gz") == "2024-03-09"
    with pytest.raises(P.IngestError, match="day of each input"):
        P.day_of(tmp_path / "events.csv")


def test_the_flow_maps_days_on_a_dask_local_cluster(days, tmp_path, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from flows import nightly as F
    from recsys_pretrain import nightly as N
    from recsys_pretrain.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data_dir={tmp_path / 'data'}", "flow.partitioned=true",
                                                       "flow.dask_workers=2", "flow.dask_processes=false"])
    runner = F.dask_runner(cfg)
    assert runner.cluster_kwargs == {"processes": False, "n_workers": 2, "threads_per_worker": 1}
    seen = []
    real = N.ingest_partition_step

    def where(day, files, cfg):  # on a Dask worker, not in the flow's own thread
        from distributed import get_worker

        seen.append(get_worker().address)
        return real(day, files, cfg)

    monkeypatch.setattr(N, "ingest_partition_step", where)
    from distributed import LocalCluster

    with prefect_test_harness(server_startup_timeout=120):
        first = F.ingest_partitioned(days[:3], cfg)  # a LocalCluster of 2 workers, started for the run
        assert len(set(seen)) == 2
        with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:  # an existing one
            at = dataclasses.replace(cfg, flow=dataclasses.replace(cfg.flow, dask_address=cluster.scheduler_address))
            assert F.dask_runner(at).address == cluster.scheduler_address
            second = F.ingest_partitioned(days, at)
            workers = {w.address for w in cluster.workers.values()}
        third = F.ingest_partitioned(days, cfg)
    assert set(seen[3:]) == workers
    assert [d["skipped"] for d in first["days"]] == [False] * 3 and len(seen) == 5
    assert [d["day"] for d in second["days"]] == [P.day_of(f) for f in days[3:]]
    assert third["days"] == [] and third["ingested"] == second["ingested"]
    assert second["ingested"] != first["ingested"]
    report = pl.read_parquet(Path(second["ingested"]) / "events.parquet").height
    mono = ingest(days, tmp_path / "mono", CFG).report
    assert report == mono["rows_accepted"]
    prepared = N.prepare_step(second["ingested"], cfg)
    assert (Path(prepared) / "loo.parquet").exists()
    assert os.path.basename(second["ingested"]).startswith("p-")


def test_forget_reaches_every_partition_and_the_next_window(days, tmp_path, capsys):
    from recsys_pretrain.cli import main
    from recsys_pretrain.data.forget import last_forget, read_marker

    store = tmp_path / "store"
    _ingest_nights(days, store)
    all_days = P.window(store)
    key1 = P.window_key(store, all_days, CFG)
    P.combine(store, tmp_path / "before", CFG)
    before = pl.read_parquet(tmp_path / "before" / "events.parquet")
    vocab = Vocab.load(store / "vocab.json")
    user = 3  # has events on several days and a quarantined row (event type "teleport") on day 3
    mine = {d: pl.read_parquet(P.events_path(store, d)).filter(pl.col(S.USER_ID) == user).height for d in all_days}
    assert sum(n > 0 for n in mine.values()) >= 2
    states = P.read_states(store)

    res = P.forget_store(store, [str(user), "no-such-user"], CFG)
    assert (res["users_found"], res["not_found"], res["changed"]) == (1, [1], True)
    assert res["events_removed"] == sum(mine.values()) and res["quarantine_removed"] == 1
    for d in all_days:
        ev, q = pl.read_parquet(P.events_path(store, d)), pl.read_parquet(P.quarantine_path(store, d))
        assert user not in ev[S.USER_ID].to_list() and str(user) not in q["user_id"].to_list()
        rep = P.read_states(store)[d]["report"]
        assert rep["rows_read"] == states[d]["report"]["rows_read"]  # accounting whole: moved, not lost
        assert rep["rows_read"] == (rep["rows_accepted"] + rep["rows_quarantined"] + rep["rows_duplicate"]
                                    + rep.get("rows_forgotten", 0))
        assert (rep["rows_accepted"], rep["rows_quarantined"]) == (ev.height, q.height)
    assert P.plan(days, store, CFG) == {}  # the days are not ingested again from the raw logs
    after = Vocab.load(store / "vocab.json")
    slot = int(vocab.user_index([user])[0])
    assert after.n_users == vocab.n_users and after.users[slot] is None  # the slot stays, the id is gone
    others = [u for u in vocab.users.to_list() if u != user]
    assert (after.user_index(others) == vocab.user_index(others)).all()  # no other user moved
    assert after.users.drop_nulls().equals(vocab.users.filter(vocab.users != user))

    # the next combine is a new window without the user, carrying the marker (the flow trains from scratch)
    key2 = P.window_key(store, all_days, CFG)
    assert key2 != key1
    rep = P.combine(store, tmp_path / "after", CFG)
    ev = pl.read_parquet(tmp_path / "after" / "events.parquet")
    assert ev.select(RAW).equals(before.filter(pl.col(S.USER_ID) != user).select(RAW))
    assert rep["rows_forgotten"] == res["events_removed"] + res["quarantine_removed"]
    assert rep["rows_read"] == rep["rows_accepted"] + rep["rows_quarantined"] + rep["rows_duplicate"] + rep["rows_forgotten"]
    assert read_marker(tmp_path / "after")["generation"] == 1 and last_forget(tmp_path / "after") is not None
    assert (after.user_ids(ev[S.USER_IDX].to_numpy()) == ev[S.USER_ID].to_list())
    prepare(tmp_path / "after", tmp_path / "prepared", PrepareConfig())

    assert P.forget_store(store, [str(user)], CFG)["changed"] is False  # nothing left to remove
    # a later day whose raw log still holds the user brings them back, under a new index
    late = tmp_path / "raw" / "date=2030-01-01" / "events.csv"
    late.parent.mkdir(parents=True)
    header = Path(days[0]).read_text().splitlines()[0]
    late.write_text(f"{header}\n{user},5,1893456000,click,,,\n")
    _ingest_nights([*days, str(late)], store)
    assert int(P.load_vocab(store, "int").user_index([user])[0]) == vocab.n_users  # appended

    # the CLI forgets from the store and from a window combined before, in one call
    other = int(ev[S.USER_ID][0])
    assert main(["forget", str(store), str(tmp_path / "before"), "--user", str(other),
                 "format=generic", "id_type=int"]) == 0
    out = capsys.readouterr().out
    assert out.count("forgot 1 user(s)") == 2
    assert other not in pl.read_parquet(tmp_path / "before" / "events.parquet")[S.USER_ID].to_list()
    assert all(other not in pl.read_parquet(P.events_path(store, d))[S.USER_ID].to_list() for d in P.window(store))


def test_an_interrupted_forget_blocks_combine_until_rerun_and_reaches_deleted_days(days, tmp_path, monkeypatch):
    store = tmp_path / "store"
    _ingest_nights(days, store)
    all_days = P.window(store)
    user = 3

    real = P.write_json
    calls = []

    def dies_at_the_first_state(path, obj):  # killed after the files' renames, before their counts
        if "state" in Path(path).parts:
            calls.append(path)
            raise KeyboardInterrupt("killed")
        return real(path, obj)

    monkeypatch.setattr(P, "write_json", dies_at_the_first_state)
    with pytest.raises(KeyboardInterrupt):
        P.forget_store(store, [str(user)], CFG)
    monkeypatch.setattr(P, "write_json", real)
    assert calls and all(user not in pl.read_parquet(P.events_path(store, d))[S.USER_ID].to_list() for d in all_days)
    with pytest.raises(P.IngestError, match="interrupted"):
        P.combine(store, tmp_path / "view", CFG)
    res = P.forget_store(store, [str(user)], CFG)  # the rerun: nothing left in the files, counts made whole
    assert res["users_found"] == 1 and res["events_removed"] == 0  # found in the vocabulary
    rep = P.combine(store, tmp_path / "view", CFG)
    assert rep["rows_forgotten"] > 0
    assert rep["rows_read"] == rep["rows_accepted"] + rep["rows_quarantined"] + rep["rows_duplicate"] + rep["rows_forgotten"]
    q = pl.read_parquet(tmp_path / "view" / "quarantine.parquet")
    assert str(user) not in q["user_id"].to_list()
    assert Vocab.load(store / "vocab.json").users.null_count() == 1

    # a user whose days retention deleted: only the vocabulary holds the id, and it goes too
    P.drop_old(store, 1)
    gone = [u for u in Vocab.load(store / "vocab.json").users.drop_nulls().to_list()
            if u not in pl.read_parquet(P.events_path(store, all_days[-1]))[S.USER_ID].to_list()][0]
    res = P.forget_store(store, [str(gone)], CFG)
    assert (res["users_found"], res["events_removed"], res["changed"]) == (1, 0, True)
    assert gone not in Vocab.load(store / "vocab.json").users.to_list()


def test_forget_in_a_pseudonymised_store_needs_the_key_and_removes_the_tokens(days, tmp_path, monkeypatch):
    from recsys_pretrain import privacy

    monkeypatch.setenv("RECSYS_TEST_PART_KEY", "a-partition-test-key-0042")
    cfg = dataclasses.replace(CFG, pseudonymise_key_env="RECSYS_TEST_PART_KEY")
    key = privacy.key_from_config(cfg)
    store = tmp_path / "store"
    for day, fs in P.plan(days, store, cfg).items():
        P.ingest_partition(day, fs, store, cfg)
    P.update_vocab(store, "int")
    tok = privacy.token("3", key)  # user 3: events on several days, a quarantined row on day 3
    assert any(tok in pl.read_parquet(P.events_path(store, d))[S.USER_ID].to_list() for d in P.window(store))
    with pytest.raises(privacy.PrivacyError, match="pseudonymised"):
        P.forget_store(store, ["3"], cfg)
    res = P.forget_store(store, ["3"], cfg, key=key)
    assert res["users_found"] == 1 and res["events_removed"] > 0 and res["quarantine_removed"] == 1
    for d in P.window(store):
        assert tok not in pl.read_parquet(P.events_path(store, d))[S.USER_ID].to_list()
        assert tok not in pl.read_parquet(P.quarantine_path(store, d))["user_id"].to_list()
    assert tok not in Vocab.load(store / "vocab.json").users.to_list()
    rep = P.combine(store, tmp_path / "view", cfg)
    assert rep["rows_read"] == rep["rows_accepted"] + rep["rows_quarantined"] + rep["rows_duplicate"] + rep["rows_forgotten"]
