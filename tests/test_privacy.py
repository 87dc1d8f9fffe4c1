"""Privacy: pseudonymised user ids (no raw id, no key in any output), recommendations by raw id with the
key, and `forget` (every row of a user gone, accounting whole, the retrain-from-scratch marker)."""

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys_pretrain import privacy
from recsys_pretrain import schema as S
from recsys_pretrain.cli import main
from recsys_pretrain.config import IndexConfig, IngestConfig, PrepareConfig, load_config
from recsys_pretrain.data.forget import MARKER, forget, forget_pending, last_forget, read_marker
from recsys_pretrain.data.ingest import ingest
from recsys_pretrain.data.prepare import prepare
from recsys_pretrain.vocab import Vocab

KEY = "k3y-Zq81-never-in-any-output-77f0"  # distinctive, so that a leak is found by grepping
ENV = "RECSYS_TEST_USER_KEY"
RAW = ("alice-7731", "bob-4410", "carol-9052", "dave-1186", "erin-5520")
HEADER = "user_id,item_id,timestamp,event_type\n"
LOG = HEADER + "".join([
    "alice-7731,i1,1700000000,click\n",
    "alice-7731,i2,1700000100,purchase\n",
    "alice-7731,i2,1700000100,purchase\n",  # an exact repeat: counted as duplicate, never stored
    "alice-7731,i9,yesterday,click\n",  # quarantined (bad timestamp) with the raw user id in it
    "bob-4410,i1,1700000200,click\n",
    "bob-4410,i3,1700000300,click\n",
    "carol-9052,i2,1700000400,click\n",
    "carol-9052,i3,1700000500,click\n",
    "carol-9052,i4,1700000600,click\n",
    "dave-1186,i1,1700000700,teleport\n",  # quarantined only (unknown event type): no events at all
    "erin-5520,i3,1700000800,click\n",  # one event: below min_user_events=2, moved to the quarantine by k-core
    " bob-4410 ,i4,1700000900,click\n",  # blanks around an id are not part of it
    ",i1,1700001000,click\n",  # missing user id
])


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    return KEY.encode()


def _ingest(write, out, **extra):
    return ingest([write("raw/log.csv", LOG)], out, IngestConfig(pseudonymise_key_env=ENV, min_user_events=2,
                                                                  **extra)).report


def _values(path: Path) -> str:
    """Everything a Parquet file holds (names and values) as text: its bytes are compressed, so grepping
    them alone could miss an id."""
    df = pl.read_parquet(path)
    return " ".join(df.columns) + " " + " ".join(str(v) for col in df.iter_columns() for v in col.to_list())


def _leaks(root: Path, needles) -> list[str]:
    """(file, needle) for every needle found in any file under `root` but the raw input."""
    found = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.is_symlink() or "raw" in p.relative_to(root).parts:
            continue
        if p.name == ".recsys-pretrain":  # the output marker: a time, whose digits may hold "1186"
            continue
        data = p.read_bytes()
        text = _values(p) if p.suffix == ".parquet" else ""
        found += [f"{p.relative_to(root)}: {n}" for n in needles if n.encode() in data or n in text]
    return found


# ---- the key and the hash ------------------------------------------------------------------------------------
def test_load_key_from_env_or_file_with_clear_errors_that_never_show_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, KEY + "\n")
    assert privacy.load_key(env=ENV) == KEY.encode()
    (tmp_path / "key").write_text(KEY + "\n")
    assert privacy.load_key(file=tmp_path / "key") == KEY.encode()
    assert privacy.load_key() is None
    monkeypatch.setenv("SHORT_KEY", "abc")
    monkeypatch.setenv("EMPTY_KEY", "  ")
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    (tmp_path / "empty").write_text("\n")
    for kwargs, says in [({"env": "NO_SUCH_KEY_VAR"}, "NO_SUCH_KEY_VAR is not set"),
                         ({"env": "EMPTY_KEY"}, "EMPTY_KEY is empty"),
                         ({"env": "SHORT_KEY"}, "fewer than 16"),
                         ({"file": tmp_path / "nope"}, "does not exist"),
                         ({"file": tmp_path / "empty"}, "is empty"),
                         ({"env": ENV, "file": tmp_path / "key"}, "not both")]:
        with pytest.raises(privacy.PrivacyError, match=says) as err:
            privacy.load_key(**kwargs)
        assert KEY not in str(err.value) and "abc" not in str(err.value)
    # an ingest configured with a missing key fails before writing anything
    with pytest.raises(privacy.PrivacyError, match="NO_SUCH_KEY_VAR"):
        ingest([tmp_path / "key"], tmp_path / "out", IngestConfig(pseudonymise_key_env="NO_SUCH_KEY_VAR"))
    assert not (tmp_path / "out").exists()


def test_tokens_are_stable_keyed_and_the_same_however_computed():
    k1, k2 = b"a" * 32, b"b" * 32
    ids = pl.Series(["alice-7731", None, "bob-4410", "alice-7731"])
    t1 = privacy.pseudonymise(ids, k1)
    assert t1.to_list() == privacy.pseudonymise(ids, k1).to_list()  # stable
    assert t1[0] == t1[3] != t1[2] and t1[1] is None
    assert re.fullmatch(r"[0-9a-f]{32}", t1[0])
    assert privacy.pseudonymise(ids, k2)[0] != t1[0]  # keyed
    assert privacy.pseudonymise_ids(["alice-7731", " alice-7731 ", None, True], k1) == [t1[0], t1[0], None, None]
    assert pl.DataFrame({"u": ids}).select(privacy.pseudonymise(pl.col("u"), k1))["u"].to_list() == t1.to_list()
    # integer ids hash as their decimal text, however they are given
    ints = privacy.pseudonymise(pl.Series([42, 7]), k1).to_list()
    assert privacy.pseudonymise_ids([42, "42", np.int64(42)], k1) == [ints[0]] * 3
    assert privacy.pseudonymise_ids(["0042"], k1, id_type="int") == [ints[0]]


# ---- ingest -----------------------------------------------------------------------------------------------------
def test_ingest_with_a_key_leaves_no_raw_user_id_and_no_key_in_any_output(write, tmp_path, key):
    r = _ingest(write, tmp_path / "out")
    assert r["user_ids"] == "pseudonymised (hmac-sha256)"
    assert r["config"]["pseudonymise_key_env"] == ENV  # the variable's name, not its value
    assert r["rows_read"] == r["rows_accepted"] + r["rows_quarantined"] + r["rows_duplicate"]
    assert (r["rows_accepted"], r["rows_duplicate"], r["users"]) == (8, 1, 3)  # alice, bob (3 rows), carol
    assert r["quarantine_by_reason"] == {"bad_timestamp": 1, "unknown_event_type": 1, "below_min_user_events": 1,
                                         "missing_user_id": 1}
    assert not _leaks(tmp_path, [*RAW, KEY, "7731", "4410", "9052", "1186", "5520"])
    vocab = Vocab.load(tmp_path / "out")
    assert vocab.users.dtype == pl.String and all(re.fullmatch(r"[0-9a-f]{32}", u) for u in vocab.users)
    assert sorted(vocab.users) == sorted(privacy.pseudonymise_ids(["alice-7731", "bob-4410", "carol-9052"], key))
    # the quarantine's user column holds the tokens too (null where the row had no user id)
    q = pl.read_parquet(tmp_path / "out" / "quarantine.parquet")
    by_reason = dict(zip(q["reason"], q["user_id"], strict=True))
    assert by_reason["unknown_event_type"] == privacy.token("dave-1186", key)
    assert by_reason["below_min_user_events"] == privacy.token("erin-5520", key)
    assert by_reason["missing_user_id"] is None
    # events and their indices agree with the vocabulary
    ev = pl.read_parquet(tmp_path / "out" / "events.parquet")
    assert (vocab.user_index(ev[S.USER_ID]) == ev[S.USER_IDX].to_numpy()).all()


# An open quote swallows the lines after it into one field (the CSV reader); a line with extra fields shifts an
# id into another column (read line by line): raw ids of other rows in fields besides the user column.
SWALLOWED = HEADER + "".join([
    'alice-7731,"i1\n',  # the item field's quote stays open ...
    "carol-secret-1,i3,1700000200,click\n",
    'dave-secret-2,i4",1700000300,click\n',  # ... to here: one malformed row
    'bob-4410,i1,1700000400,"click\n',  # the event type swallows a row: unknown_event_type
    'carol-secret-3,i2,1700000500,click"\n',
    "bob-4410,i2,1700000600,click\n",
    "bob-4410,i3,1700000700,click\n",
])
SHIFTED = HEADER + "".join([
    "x-0,carol-secret-4,i1,1700000000,click\n",  # extra fields: the id sits in the item column
    'alice-7731,"i2,1700000100,click\n',  # a quote never closed: malformed (this file is read line by line)
    "carol-secret-5,i3,1700000200,click\n",
    "carol-secret-5,i4,1700000300,click\n",
])


def test_broken_rows_keep_no_raw_id_of_the_rows_they_swallowed(write, tmp_path, key):
    d = tmp_path / "out"
    r = ingest([write("raw/swallowed.csv", SWALLOWED), write("raw/shifted.csv", SHIFTED)], d,
               IngestConfig(pseudonymise_key_env=ENV)).report
    # the open quote in the event-type column swallowed later lines: malformed, like the other broken rows
    assert r["quarantine_by_reason"] == {"malformed_row": 3, "extra_fields": 1}
    assert not _leaks(tmp_path, ["carol-secret", "dave-secret", "x-0", "alice-7731", "bob-4410", KEY])
    q = pl.read_parquet(d / "quarantine.parquet")
    assert set(q.columns) >= {"source_file", "source_row", "reason", "field"}
    assert q["source_file"].str.ends_with(".csv").all() and q["source_row"].is_not_null().all()
    broken = q.filter(pl.col("reason").is_in(["malformed_row", "extra_fields"]))
    for c in ("item_id", "timestamp", "event_type"):  # every field of a broken row: a token of its text
        assert broken[c].str.contains(r"^[0-9a-f]{32}$").all(), c
    shifted = q.filter(pl.col("reason") == "extra_fields").row(0, named=True)
    assert shifted["item_id"] == privacy.token("carol-secret-4", key)
    # the row whose event-type field swallowed later lines is malformed too: every field of it hashed
    swallowing = q.filter(pl.col("event_type").is_not_null() & (pl.col("reason") == "malformed_row"))
    assert swallowing.height >= 1
    # forget finds a user whose id a broken row holds in another column
    res = forget(d, ["carol-secret-4"], key=key)
    assert (res["users_found"], res["quarantine_removed"], res["events_removed"]) == (1, 1, 0)
    _check_consistent(d)
    # without a key the quarantine keeps the rows as read
    ingest([tmp_path / "raw" / "swallowed.csv"], tmp_path / "plain", IngestConfig())
    assert "carol-secret-1" in " ".join(pl.read_parquet(tmp_path / "plain" / "quarantine.parquet")["item_id"])


def test_the_same_key_gives_the_same_tokens_in_memory_and_out_of_core(write, tmp_path, key):
    _ingest(write, tmp_path / "a")
    _ingest(write, tmp_path / "b", in_memory_rows=0, partition_rows=2)  # the streaming path, in user ranges
    cols = [S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.USER_IDX, S.ITEM_IDX]
    a, b = (pl.read_parquet(tmp_path / d / "events.parquet", columns=cols) for d in "ab")
    assert a.equals(b)
    assert not _leaks(tmp_path, [*RAW, KEY])


def test_without_a_key_nothing_changes(write, tmp_path):
    r = ingest([write("raw/log.csv", LOG)], tmp_path / "out", IngestConfig()).report
    assert r["user_ids"] == "raw"
    assert "alice-7731" in Vocab.load(tmp_path / "out").users.to_list()
    leaks = _leaks(tmp_path, ["alice-7731", "dave-1186"])  # the leak check finds ids where they are
    assert any("events.parquet" in x for x in leaks) and any("quarantine.parquet: dave" in x for x in leaks)


# ---- recommend ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pseudonymised_model(tmp_path_factory):
    """A synthetic log with distinctive text user ids, ingested with a key, prepared, and an MF model on it."""
    from recsys_pretrain.data.synthetic import SynthConfig, write_synthetic
    from recsys_pretrain.index import build_model_index
    from recsys_pretrain.tracking import MLflowTracker
    from recsys_pretrain.train.pretrain import pretrain

    root = tmp_path_factory.mktemp("pseudo")
    (root / "raw").mkdir()
    write_synthetic(SynthConfig(n_users=120, n_items=60, n_categories=4, events_per_user=30, seed=3),
                    root / "raw" / "synth.csv")
    log = pl.read_csv(root / "raw" / "synth.csv").with_columns(pl.format("cust-{}-q7x", "user_id").alias("user_id"))
    log.write_csv(root / "raw" / "log.csv")
    (root / "raw" / "key").write_text(KEY + "\n")
    cfg = IngestConfig(pseudonymise_key_file=str(root / "raw" / "key"))
    ingest([root / "raw" / "log.csv"], root / "ingested", cfg)
    prepare(root / "ingested", root / "prepared", PrepareConfig())
    over = ["pretrain.model=mf", "pretrain.mf.dim=8", "pretrain.mf.train.progress=false"]
    tracker = MLflowTracker(f"sqlite:///{root / 'mlflow.db'}")  # its artifacts beside the db, under root
    model_dir = pretrain(root / "prepared", load_config(None, over).pretrain, root / "run", tracker=tracker).model_dir
    build_model_index(model_dir, root / "index", IndexConfig(factory="Flat"), tracker=tracker)
    return {"root": root, "model": model_dir, "raw_users": log["user_id"].unique().sort().to_list()}


def test_no_raw_id_reaches_prepared_data_models_mlflow_or_the_index(pseudonymised_model):
    root = pseudonymised_model["root"]
    assert (root / "mlflow.db").exists() and (root / "index").exists()
    assert not _leaks(root, ["cust-", "-q7x", KEY])


def test_recommend_with_the_key_finds_users_by_raw_id(pseudonymised_model):
    from recsys_pretrain.recommend import Recommender

    raw = pseudonymised_model["raw_users"][:3]
    rec = Recommender.load(pseudonymised_model["model"], user_key=KEY.encode())
    answers = rec.recommend([*raw, "cust-nobody-q7x"], k=5)
    assert all(a.method == "user_vector" and a.fallback is None for a in answers[:3])
    assert answers[3].fallback == "unknown_user" and answers[3].unknown == ["cust-nobody-q7x"]
    # the same user by token, without the key: the same answer
    token = privacy.token(raw[0], KEY.encode())
    plain = rec.with_user_key(None)
    assert plain.recommend([token], k=5)[0].ids == answers[0].ids
    assert plain.recommend([raw[0]], k=5)[0].fallback == "unknown_user"  # raw ids need the key


def _hand_recommender(vocab: Vocab):
    """A Recommender over random vectors for `vocab` (no training): enough to test id lookups."""
    import scipy.sparse as sp

    from recsys_pretrain.index import build_index
    from recsys_pretrain.recommend import Recommender

    rng = np.random.default_rng(0)
    items = rng.normal(size=(vocab.n_items, 4)).astype(np.float32)
    users = rng.normal(size=(vocab.n_users, 4)).astype(np.float32)
    index = build_index(items, vocab, IndexConfig(factory="Flat"))
    return Recommender(None, {"model": "mf"}, vocab, index, users,
                       sp.csr_matrix((vocab.n_users, vocab.n_items + 1), dtype=np.float32),
                       np.ones(vocab.n_items, dtype=np.float32))


def test_recommend_hashes_integer_ids_as_ingest_read_them(write, tmp_path, key):
    log = HEADER + "0042,11,1700000000,click\n 42 ,12,1700000100,click\n7,11,1700000200,click\n"
    ingest([write("raw/ints.csv", log)], tmp_path / "out", IngestConfig(id_type="int", pseudonymise_key_env=ENV))
    vocab = Vocab.load(tmp_path / "out")
    assert sorted(vocab.users) == sorted(privacy.pseudonymise_ids([42, 7], key))  # "0042" was user 42
    rec = _hand_recommender(vocab).with_user_key(key, "int")
    answers = rec.recommend(["0042", " 42 ", 42, "+42", np.int64(7), "7", "x42", "4 2"], k=1)
    assert [a.fallback for a in answers] == [None] * 6 + ["unknown_user"] * 2
    assert answers[0].ids == answers[1].ids == answers[2].ids == answers[3].ids
    assert rec.with_user_key(None).recommend(["0042"], k=1)[0].fallback == "unknown_user"  # the id type is kept
    assert rec.with_user_key(key).recommend(["0042"], k=1)[0].fallback is None
    # text ids stay text: "0042" is not "42" there
    assert rec.with_user_key(key, "str").recommend(["0042", "42"], k=1)[0].fallback == "unknown_user"
    with pytest.raises(ValueError, match="user_id_type"):
        rec.with_user_key(key, "integer")


def test_serve_takes_raw_user_ids_with_the_key(pseudonymised_model, monkeypatch):
    import logging
    from dataclasses import replace

    import httpx

    from recsys_pretrain.config import ServeConfig
    from recsys_pretrain.serve import ADMIN_TOKEN_ENV, create_app, make_holder
    from tests.test_serve import running

    monkeypatch.setenv(ENV, KEY)
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    root, raw = pseudonymised_model["root"], pseudonymised_model["raw_users"][0]
    cfg = ServeConfig(model=str(pseudonymised_model["model"]), index=str(root / "index"), user_key_env=ENV)
    holder = make_holder(cfg)
    try:
        with running(create_app(holder, cfg), cfg) as (server, url), httpx.Client(base_url=url, timeout=10) as c:
            assert server.config.access_log is False  # raw ids are in the URLs
            r = c.get(f"/recommend/{raw}", params={"k": 3}).json()
            assert (r["method"], r["fallback"], r["user_id"]) == ("user_vector", None, raw)
            assert c.post("/admin/reload").status_code == 200  # the reloaded model gets the key too
            again = c.get(f"/recommend/{raw}", params={"k": 3}).json()
            assert again["index_version"] == 2 and again["method"] == "user_vector" and again["items"] == r["items"]
            assert c.get("/recommend/cust-nobody-q7x").json()["fallback"] == "unknown_user"
    finally:
        holder.close()

    # the access log, when turned on anyway, shows no raw id
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    access = logging.getLogger("uvicorn.access")
    logged = replace(cfg, access_log=True)
    holder = make_holder(logged)
    try:
        with running(create_app(holder, logged), logged) as (_, url), httpx.Client(base_url=url, timeout=10) as c:
            access.addHandler(handler)
            assert c.get(f"/recommend/{raw}", params={"k": 3}).json()["method"] == "user_vector"
    finally:
        access.removeHandler(handler)
        holder.close()
    assert any("/recommend/<user>?k=3" in line for line in lines) and not any(raw in line for line in lines)

    # without the key, raw ids are unknown; a key that is configured but missing stops the start
    plain = make_holder(replace(cfg, user_key_env=None))
    try:
        assert plain.current.recommend([raw], 3)[0].fallback == "unknown_user"
    finally:
        plain.close()
    monkeypatch.delenv(ENV)
    with pytest.raises(privacy.PrivacyError, match=f"serve.user_key_env.*{ENV} is not set"):
        make_holder(cfg)


def test_recommend_cli_hashes_raw_ids_with_the_key(pseudonymised_model, capsys, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    raw = pseudonymised_model["raw_users"][0]
    model = str(pseudonymised_model["model"])
    assert main(["recommend", "--model", model, "--user", raw, "--key-env", ENV, "--json", "-k", "3"]) == 0
    (out,) = json.loads(capsys.readouterr().out)
    assert out["user"] == raw and out["method"] == "user_vector"
    assert main(["recommend", "--model", model, "--user", raw, "--json", "-k", "3"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["fallback"] == "unknown_user" and "look pseudonymised" in captured.err


# ---- forget ------------------------------------------------------------------------------------------------------
def _check_consistent(d: Path) -> dict:
    """The invariants ingest guarantees, still true: accounting, indices = vocabulary positions, every
    vocabulary user and item has events."""
    r = json.loads((d / "report.json").read_text())
    assert r["rows_read"] == (r["rows_accepted"] + r["rows_quarantined"] + r["rows_duplicate"]
                              + r.get("rows_forgotten", 0))
    ev = pl.read_parquet(d / "events.parquet")
    q = pl.read_parquet(d / "quarantine.parquet")
    vocab = Vocab.load(d)
    assert (r["rows_accepted"], r["rows_quarantined"], r["users"], r["items"]) == (
        ev.height, q.height, vocab.n_users, vocab.n_items)
    assert (vocab.user_index(ev[S.USER_ID]) == ev[S.USER_IDX].to_numpy()).all()
    assert (vocab.item_index(ev[S.ITEM_ID]) == ev[S.ITEM_IDX].to_numpy()).all()
    assert ev[S.USER_IDX].n_unique() == vocab.n_users and ev[S.ITEM_IDX].n_unique() == vocab.n_items
    assert ev.equals(ev.sort(S.USER_IDX, S.TIMESTAMP, maintain_order=True))  # still sorted as ingest sorts
    return r


def test_forget_removes_every_row_of_a_user_and_keeps_the_data_consistent(write, tmp_path, key):
    d = tmp_path / "out"
    _ingest(write, d)
    alice = privacy.token("alice-7731", key)
    assert last_forget(d) is None and forget_pending(d, None) is None

    res = forget(d, ["alice-7731"], key=key)
    assert res == {"dir": str(d), "users_requested": 1, "users_found": 1, "not_found": [], "events_removed": 2,
                   "quarantine_removed": 1, "items_dropped": 0, "changed": True}
    ev, q = pl.read_parquet(d / "events.parquet"), pl.read_parquet(d / "quarantine.parquet")
    assert alice not in ev[S.USER_ID].to_list() and alice not in q["user_id"].to_list()
    assert alice not in Vocab.load(d).users.to_list()
    r = _check_consistent(d)
    assert r["rows_forgotten"] == 3 and r["users"] == 2
    marker = read_marker(d)
    assert marker["generation"] == 1 and marker["users"] == 1 and r["forgotten"]["events_removed"] == 2
    assert alice not in json.dumps(marker) and alice not in (d / "report.md").read_text()
    assert "Forgotten users" in (d / "report.md").read_text()
    assert not _leaks(tmp_path, [*RAW, KEY])
    prepare(d, tmp_path / "prepared", PrepareConfig())  # what prepare reads is consistent

    # a user only in the quarantine, and everyone else: every item is left without events
    res = forget(d, ["dave-1186", "bob-4410", "carol-9052"], key=key)
    assert (res["users_found"], res["quarantine_removed"], res["items_dropped"]) == (3, 1, 4)
    r = _check_consistent(d)
    assert r["users"] == 0 and r["items"] == 0 and read_marker(d)["generation"] == 2
    assert r["forgotten"]["users"] == 4 and len(r["forgotten"]["history"]) == 2


def test_forget_of_unknown_users_is_a_reported_no_op(write, tmp_path, key):
    d = tmp_path / "out"
    _ingest(write, d)
    before = (d / "events.parquet").read_bytes(), (d / "report.json").read_text()
    res = forget(d, ["nobody-0000", "   "], key=key)
    assert (res["changed"], res["users_found"], res["not_found"]) == (False, 0, [0, 1])
    assert ((d / "events.parquet").read_bytes(), (d / "report.json").read_text()) == before
    assert read_marker(d) is None
    res = forget(d, ["alice-7731", "nobody-0000"], key=key)  # partly known: the known one goes
    assert (res["users_found"], res["not_found"]) == (1, [1])
    assert forget(d, ["alice-7731"], key=key)["changed"] is False  # twice: nothing left to remove


def test_forget_needs_the_key_exactly_when_the_data_was_pseudonymised(write, tmp_path, key):
    _ingest(write, tmp_path / "pseudo")
    with pytest.raises(privacy.PrivacyError, match="pseudonymised"):
        forget(tmp_path / "pseudo", ["alice-7731"])
    ingest([write("raw/log.csv", LOG)], tmp_path / "plain", IngestConfig())
    with pytest.raises(privacy.PrivacyError, match="not pseudonymised"):
        forget(tmp_path / "plain", ["alice-7731"], key=key)
    with pytest.raises(FileNotFoundError):
        forget(tmp_path / "nowhere", ["alice-7731"])


def test_forget_raw_integer_ids(write, tmp_path):
    log = HEADER + "7,11,1700000000,click\n7,12,1700000001,click\n0007,13,yesterday,click\n8,11,1700000002,click\n"
    d = tmp_path / "out"
    ingest([write("raw/log.csv", log)], d, IngestConfig(id_type="int"))
    res = forget(d, [7], key=None)  # the quarantined "0007" is the same user
    assert (res["events_removed"], res["quarantine_removed"]) == (2, 1)
    assert Vocab.load(d).users.to_list() == [8]
    _check_consistent(d)
    assert forget(d, ["8"])["events_removed"] == 1


def test_forget_pending_tells_the_nightly_flow_to_retrain_from_scratch(write, tmp_path, key):
    root = tmp_path / "ingested"
    _ingest(write, root / "night1")
    _ingest(write, root / "night2")
    trained = datetime.now(UTC)
    assert forget_pending(root, trained) is None
    forget(root / "night1", ["alice-7731"], key=key)
    when = last_forget(root)  # searched one level down
    assert when is not None and when >= trained and last_forget(root / "night2") is None
    assert "from scratch" in forget_pending(root, trained)
    assert "from scratch" in forget_pending([root / "night1"], trained.isoformat())
    assert forget_pending(root, None) is not None  # a model of unknown age: retrain
    assert forget_pending(root, when + timedelta(seconds=1)) is None  # trained after the forget


def test_forget_cli(write, tmp_path, key, capsys):
    d = tmp_path / "out"
    _ingest(write, d)
    users = write("ids.txt", "bob-4410\n\nnobody-0000\n")
    assert main(["forget", str(d), "--user", "alice-7731", "--users-file", str(users), "--key-env", ENV]) == 0
    out = capsys.readouterr().out
    assert "forgot 2 user(s)" in out and "given as #3" in out and "alice" not in out and "nobody" not in out
    assert read_marker(d)["users"] == 2
    assert main(["forget", str(d), "--user", "alice-7731", f"ingest.pseudonymise_key_env={ENV}"]) == 0
    assert "nothing removed" in capsys.readouterr().out
    assert main(["forget", str(d), "--user", "alice-7731"]) == 2  # pseudonymised data, no key
    assert "pseudonymised" in capsys.readouterr().err
    assert (d / MARKER).exists()
