import gzip
import json

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys_pretrain import schema as S
from recsys_pretrain.config import IngestConfig
from recsys_pretrain.data.formats import IngestError
from recsys_pretrain.data.ingest import ingest
from recsys_pretrain.vocab import Vocab

HEADER = "user_id,item_id,timestamp,event_type,value\n"


def run(paths, out, **cfg):
    return ingest([paths] if not isinstance(paths, list) else paths, out, IngestConfig(**cfg))


def accounted(report):
    return report["rows_read"] == report["rows_accepted"] + report["rows_quarantined"] + report["rows_duplicate"]


def test_row_level_problems_are_quarantined_with_file_row_and_field(write, tmp_path):
    src = write(
        "log.csv",
        HEADER
        + "u1,i1,1700000000,pv,\n"  # 1 ok (pv -> click)
        + ",i2,1700000001,buy,\n"  # 2 missing user
        + "u3,i3,yesterday,view,\n"  # 3 unparseable timestamp
        + "u4,i4,100,click,\n"  # 4 out of range (1970)
        + "u5,i5,1700000002,teleport,\n"  # 5 unknown event type
        + "u6,i6,1700000003,buy,cheap\n"  # 6 value of the wrong type
        + "u1,i1,1700000000,click,\n"  # 7 duplicate of row 1 after alias mapping
        + "u7,,1700000004,cart,\n"  # 8 missing item
        + "u7,i7,1700000005,,\n",  # 9 missing event type
    )
    r = run(src, tmp_path / "out").report
    assert (r["rows_read"], r["rows_accepted"], r["rows_quarantined"], r["rows_duplicate"]) == (9, 1, 7, 1)
    q = pl.read_parquet(tmp_path / "out" / "quarantine.parquet").sort(S.SOURCE_ROW)
    assert q[S.SOURCE_ROW].to_list() == [2, 3, 4, 5, 6, 8, 9]
    assert q[S.REASON].to_list() == [
        "missing_user_id", "bad_timestamp", "timestamp_out_of_range", "unknown_event_type", "bad_value",
        "missing_item_id", "missing_event_type",
    ]
    assert q["field"].to_list() == ["user_id", "timestamp", "timestamp", "event_type", "value", "item_id",
                                    "event_type"]
    assert set(q[S.SOURCE_FILE]) == {str(src)}
    # rows are kept exactly as read, wrong values included
    assert q.filter(pl.col(S.SOURCE_ROW) == 3)["timestamp"].item() == "yesterday"
    assert q.filter(pl.col(S.SOURCE_ROW) == 6)["value"].item() == "cheap"


def test_events_sorted_by_user_then_time_ties_keep_input_order(write, tmp_path):
    src = write(
        "log.csv",
        HEADER
        + "b,x,1700000010,click,\n"
        + "a,z,1700000005,click,\n"
        + "a,y,1700000001,click,\n"
        + "a,w,1700000005,purchase,\n"  # same second as row 2: input order is kept
        + "b,v,1700000000,click,\n",
    )
    run(src, tmp_path / "out")
    ev = pl.read_parquet(tmp_path / "out" / "events.parquet")
    assert ev[S.USER_ID].to_list() == ["a", "a", "a", "b", "b"]
    assert ev[S.ITEM_ID].to_list() == ["y", "z", "w", "v", "x"]
    assert ev[S.TIMESTAMP].dtype == S.TIMESTAMP_DTYPE
    assert ev[S.EVENT_TYPE].dtype == S.EVENT_DTYPE
    vocab = Vocab.load(tmp_path / "out")
    assert vocab.pad == 0 and vocab.mask == vocab.n_items + 1 == 6
    # indices agree with the vocab: raw ids round-trip
    assert vocab.item_ids(ev[S.ITEM_IDX].to_numpy()) == ev[S.ITEM_ID].to_list()
    assert vocab.user_ids(ev[S.USER_IDX].to_numpy()) == ev[S.USER_ID].to_list()


@pytest.mark.parametrize("kind", ["csv", "tsv", "parquet", "ndjson", "csv.gz"])
def test_generic_file_kinds(write, tmp_path, kind):
    rows = [("u1", "i1", 1700000000, "click"), ("u1", "i2", 1700000100, "purchase"), ("u2", "i1", 1700000050, "view")]
    df = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp", "event_type"], orient="row")
    path = tmp_path / f"log.{kind}"
    if kind == "csv":
        df.write_csv(path)
    elif kind == "tsv":
        df.write_csv(path, separator="\t")
    elif kind == "parquet":
        df.write_parquet(path)
    elif kind == "ndjson":
        df.write_ndjson(path)
    else:
        with gzip.open(path, "wb") as fh:
            df.write_csv(fh)
    r = run(path, tmp_path / "out").report
    assert r["rows_accepted"] == 3 and r["users"] == 2 and r["items"] == 2
    assert r["events_by_type"] == {"click": 2, "purchase": 1}


def test_generic_column_mapping_iso_times_and_int_ids(write, tmp_path):
    src = write(
        "log.csv",
        "visitor,product,when,action\n"
        "10,7,2024-01-01T10:00:00Z,view\n"
        "10,8,2024-01-01 11:00:00,addtocart\n"
        "2,7,2024-01-02T00:00:00+02:00,transaction\n"
        "x,7,2024-01-02T00:00:00Z,view\n",
    )
    cols = {"user_id": "visitor", "item_id": "product", "timestamp": "when", "event_type": "action"}
    r = run(src, tmp_path / "out", columns=cols, id_type="int", timestamp_format="iso").report
    assert r["rows_accepted"] == 3 and r["quarantine_by_reason"] == {"bad_user_id": 1}
    ev = pl.read_parquet(tmp_path / "out" / "events.parquet")
    assert ev[S.USER_ID].dtype == pl.Int64
    assert ev[S.USER_ID].to_list() == [2, 10, 10]  # integer order, not text order
    assert ev[S.EVENT_TYPE].to_list() == ["purchase", "click", "add_to_cart"]
    assert str(ev[S.TIMESTAMP][0]) == "2024-01-01 22:00:00+00:00"


def test_ndjson_malformed_line_is_quarantined(write, tmp_path):
    src = write(
        "log.ndjson",
        '{"user_id": "a", "item_id": 1, "timestamp": 1700000000, "event_type": "click"}\n'
        "{not json\n"
        '{"user_id": "b", "item_id": 2, "timestamp": 1700000001, "event_type": "click"}\n',
    )
    r = run(src, tmp_path / "out").report
    assert r["rows_accepted"] == 2 and r["quarantine_by_reason"] == {"malformed_row": 1}
    assert accounted(r)


def test_movielens_variants(write, tmp_path):
    udata = write("u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t377\t1\t878887116\n")
    csv = write("ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.0,964981247\n")
    dat = write("ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978300000\n")
    for path, n in ((udata, 3), (csv, 2), (dat, 3)):
        r = run(path, tmp_path / path.stem, format="movielens").report
        assert r["rows_accepted"] == n and r["events_by_type"] == {"rating": n}, path
    ev = pl.read_parquet(tmp_path / "u" / "events.parquet")
    assert ev.filter(pl.col(S.USER_ID) == 196)[S.ITEM_ID].to_list() == [377, 242]  # time order
    assert ev[S.VALUE].to_list() == [3.0, 1.0, 3.0]  # user 186, then 196 in time order


def test_sasrec_keeps_file_order_without_timestamps(write, tmp_path):
    src = write("seq.txt", "1 5\n1 3\n2 3\n1 5\n2 9\n")
    r = run(src, tmp_path / "out", format="sasrec").report
    assert r["rows_accepted"] == 5 and r["rows_duplicate"] == 0  # no time, so a repeat is a re-consumption
    assert r["has_timestamps"] is False
    ev = pl.read_parquet(tmp_path / "out" / "events.parquet")
    assert ev.filter(pl.col(S.USER_ID) == 1)[S.ITEM_ID].to_list() == [5, 3, 5]


def test_taobao_window_and_behaviour_names(write, tmp_path):
    src = write(
        "UserBehavior.csv",
        "1,2268318,2520377,pv,1511544070\n1,2333346,2520771,buy,1511561733\n"
        "1,2576651,149192,cart,1511572885\n2,3830808,4181361,fav,1511593493\n"
        "2,4365585,2520377,pv,1212000000\n",  # 2008: outside the dataset's window
    )
    r = run(src, tmp_path / "out", format="taobao").report
    assert r["events_by_type"] == {"click": 1, "add_to_cart": 1, "favorite": 1, "purchase": 1}
    assert r["quarantine_by_reason"] == {"timestamp_out_of_range": 1}
    ev = pl.read_parquet(tmp_path / "out" / "events.parquet")
    assert ev[S.CATEGORY_ID].to_list()[0] == "2520377"


def test_retailrocket_milliseconds(write, tmp_path):
    src = write(
        "events.csv",
        "timestamp,visitorid,event,itemid,transactionid\n"
        "1433221332117,257597,view,355908,\n1433224214164,992329,addtocart,248676,\n"
        "1433221955914,992329,transaction,248676,4000\n",
    )
    r = run(src, tmp_path / "out", format="retailrocket").report
    assert r["events_by_type"] == {"click": 1, "add_to_cart": 1, "purchase": 1}
    ev = pl.read_parquet(tmp_path / "out" / "events.parquet")
    assert str(ev[S.TIMESTAMP].min()) == "2015-06-02 05:02:12.117000+00:00"


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.csv", None, "no such file"),
        ("empty.csv", "", "empty file"),
        ("header.csv", HEADER, "header only"),
        ("cols.csv", "user,item_id,timestamp\n1,2,3\n", "missing required column(s) ['user_id', 'event_type']"),
        ("latin1.csv", (HEADER + "u1,caf\xe9,1700000000,click,\n").encode("latin-1"), "not valid UTF-8"),
    ],
)
def test_file_level_problems_stop_with_a_clear_error(write, tmp_path, name, content, message):
    path = tmp_path / name if content is None else write(name, content)
    with pytest.raises(IngestError) as err:
        run(path, tmp_path / "out")
    assert str(path) in str(err.value) and message in str(err.value)
    if name == "cols.csv":
        assert "found columns ['user', 'item_id', 'timestamp']" in str(err.value)
    if name == "latin1.csv":
        assert "line 2" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_failed_ingest_leaves_previous_outputs_untouched(write, tmp_path):
    good = write("good.csv", HEADER + "u1,i1,1700000000,click,\n")
    run(good, tmp_path / "out")
    before = (tmp_path / "out" / "events.parquet").read_bytes()
    with pytest.raises(IngestError):
        run([good, tmp_path / "absent.csv"], tmp_path / "out")
    assert (tmp_path / "out" / "events.parquet").read_bytes() == before
    # no staging left behind: the input, the published link and the one version it points to
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["good.csv", "out", ".out.lock",
                                                                 (tmp_path / "out").resolve().name])


def test_many_files_keep_provenance_and_input_order(write, tmp_path):
    a = write("a.csv", HEADER + "u1,i1,1700000000,click,\nu1,i2,1700000000,click,\n")
    b = write("b.csv", HEADER + "u1,i3,1700000000,click,\n,i9,1700000000,click,\n")
    r = run([b, a], tmp_path / "out").report
    assert [f["rows_read"] for f in r["files"]] == [2, 2]
    ev = pl.read_parquet(tmp_path / "out" / "events.parquet")
    assert ev[S.ITEM_ID].to_list() == ["i3", "i1", "i2"]  # equal times: file order as given, then row order
    q = pl.read_parquet(tmp_path / "out" / "quarantine.parquet")
    assert q[S.SOURCE_FILE].to_list() == [str(b)] and q[S.SOURCE_ROW].to_list() == [2]


@pytest.mark.parametrize("in_memory_rows", [12_000_000, 0])  # in memory, and in user ranges of 3 events
def test_kcore_is_iterative_and_quarantines_verbatim(write, tmp_path, in_memory_rows):
    # u3 has 1 event -> dropped; that leaves item c with 1 event -> dropped; then u2 has 1 -> dropped.
    rows = ["u1,a,1700000001,click,", "u1,b,1700000002,click,", "u2,a,1700000003,click,",
            "u2,c,1700000004,click,", "u3,c,1700000005,click,", "u4,a,1700000006,click,", "u4,b,1700000007,click,"]
    src = write("log.csv", HEADER + "\n".join(rows) + "\n")
    r = run(src, tmp_path / "out", min_user_events=2, min_item_events=2, in_memory_rows=in_memory_rows,
            partition_rows=3).report
    ev = pl.read_parquet(tmp_path / "out" / "events.parquet")
    assert ev.group_by(S.USER_ID).len()["len"].min() >= 2
    assert ev.group_by(S.ITEM_ID).len()["len"].min() >= 2
    assert sorted(ev[S.USER_ID].unique()) == ["u1", "u4"]
    assert r["kcore"]["rows_removed"] == 3 and r["kcore"]["iterations"] >= 2 and accounted(r)
    q = pl.read_parquet(tmp_path / "out" / "quarantine.parquet").sort(S.SOURCE_ROW)
    assert q[S.SOURCE_ROW].to_list() == [3, 4, 5]
    assert q["timestamp"].to_list() == ["1700000003", "1700000004", "1700000005"]
    assert set(q[S.REASON]) <= {"below_min_user_events", "below_min_item_events"}


def test_partitioned_sort_matches_in_memory(write, tmp_path):
    lines = [f"u{i % 7},i{i % 4},{1700000000 + i % 5},click," for i in range(300)]
    src = write("log.csv", HEADER + "\n".join(lines) + "\n")
    run(src, tmp_path / "one")
    r = run(src, tmp_path / "many", partition_rows=20, in_memory_rows=0).report
    one = pl.read_parquet(tmp_path / "one" / "events.parquet")
    many = pl.read_parquet(tmp_path / "many" / "events.parquet")
    assert one.equals(many) and r["rows_duplicate"] > 0


# ---- property: every row is accounted for, and dedupe matches a reference model ------------------------
USERS = st.sampled_from(["u1", "u2", "u3", "", " u1 "])
ITEMS = st.sampled_from(["i1", "i2", "", "i3"])
TIMES = st.sampled_from(["1700000000", "1700000001", "notatime", "", "5", "1700000001 "])
EVENTS = st.sampled_from(["click", "pv", "buy", "purchase", "teleport", "", "CART"])
VALUES = st.sampled_from(["", "1.5", "abc", "2"])
ROWS = st.lists(st.tuples(USERS, ITEMS, TIMES, EVENTS, VALUES), min_size=1, max_size=40)


def _reference(rows):
    """A slow, obvious model of validation + dedupe: how many rows are accepted and duplicated."""
    alias = {**S.DEFAULT_EVENT_ALIASES}
    seen, accepted, dup = set(), 0, 0
    for u, i, t, e, v in rows:
        u, i, t, e, v = u.strip(), i.strip(), t.strip(), e.strip().lower(), v.strip()
        ok = u and i and t.isdigit() and 631152000 <= int(t) <= 4102444800 and e in alias
        ok = ok and (v == "" or v.replace(".", "", 1).isdigit())
        if not ok:
            continue
        key = (u, i, int(t), alias[e])
        if key in seen:
            dup += 1
        else:
            seen.add(key)
            accepted += 1
    return accepted, dup


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=ROWS)
def test_every_row_is_accounted_for(tmp_path_factory, rows):
    tmp = tmp_path_factory.mktemp("prop")
    src = tmp / "log.csv"
    body = "".join(f'"{u}","{i}","{t}","{e}","{v}"\n' for u, i, t, e, v in rows)
    src.write_text(HEADER + body)
    r = run(src, tmp / "out").report
    assert r["rows_read"] == len(rows)
    assert accounted(r)
    assert (r["rows_accepted"], r["rows_duplicate"]) == _reference(rows)
    q = pl.read_parquet(tmp / "out" / "quarantine.parquet")
    assert q.height == r["rows_quarantined"] and q[S.SOURCE_ROW].n_unique() == q.height
    saved = json.loads((tmp / "out" / "report.json").read_text())
    assert saved["rows_read"] == r["rows_read"]
