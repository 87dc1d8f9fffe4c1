"""A corpus of broken inputs, generated here: each file gets quarantine reasons or a one-line error.

Every case goes through the command line in-process, as a user would run it. It either ingests, with
every row accounted for (rows_read == accepted + quarantined + duplicate) and the expected reasons, or
exits with status 2 and one line on stderr, `error: <file>: ...`, never a traceback.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pytest

from recsys_pretrain import schema as S
from recsys_pretrain.cli import main
from recsys_pretrain.config import IngestConfig
from recsys_pretrain.data.formats import IngestError
from recsys_pretrain.data.ingest import ingest

HEADER = "user_id,item_id,timestamp,event_type,value\n"
GOOD = "u1,i1,1700000000,click,1.5\nu2,i2,1700000100,buy,\n"  # two rows every generic case can end with
NDJSON_GOOD = '{"user_id": "u1", "item_id": "i1", "timestamp": 1700000000, "event_type": "click"}\n'


@dataclass
class Case:
    name: str  # file name; a case writes one file (or a few, for the cases about several inputs)
    content: str | bytes | pl.DataFrame | None  # None: the file is not created
    args: list[str] = field(default_factory=list)  # CLI format and key=value overrides
    reasons: dict[str, int] | None = None  # expected quarantine_by_reason (ingest succeeds)
    rows_read: int | None = None
    accepted: int | None = None
    error: str | None = None  # expected text of the one-line error (ingest refuses the file)
    inputs: list[str] | None = None  # names given on the command line, when not just `name`


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


T0 = dt.datetime(2024, 1, 2, 3, 4, 5, 678000)
NON_UTF8_LATE = (HEADER + GOOD * 2000).encode() + b"u9,caf\xe9,1700000000,click,\n"  # past the 64 KiB sample
RANDOM_BYTES = bytes((i * 97 + 13) % 256 for i in range(512))

CASES = [
    # ---- generic CSV: encoding and line ends --------------------------------------------------------------
    Case("bom.csv", "\ufeff" + HEADER + GOOD, reasons={}, accepted=2),
    Case("bom_int_ids.csv", "\ufeff" + HEADER + "1,2,1700000000,click,\n3,4,1700000001,click,\n",
         args=["id_type=int"], reasons={}, accepted=2),
    Case("crlf.csv", (HEADER + GOOD).replace("\n", "\r\n"), reasons={}, accepted=2),
    Case("crlf_extra_field.csv", (HEADER + "u3,i3,1700000002,click,,x\n" + GOOD).replace("\n", "\r\n"),
         reasons={"extra_fields": 1}, accepted=2),
    Case("blank_lines.csv", "\n\n" + HEADER + "u1,i1,1700000000,click,\n\n\nu2,i2,1700000100,buy,\n\n",
         reasons={"empty_row": 3}, accepted=2),
    Case("latin1.csv", (HEADER + GOOD).encode() + b"u3,caf\xe9,1700000000,click,\n", error="not valid UTF-8"),
    Case("latin1_late.csv", NON_UTF8_LATE, error="line 4002"),
    Case("binary.csv", RANDOM_BYTES, error="not valid UTF-8"),
    Case("nul_bytes.csv", HEADER.encode() + b"\x00" * 64, error="a NUL byte at byte 43 (line 2)"),
    # ---- generic CSV: structure --------------------------------------------------------------------------
    Case("extra_field.csv", HEADER + "u3,i3,1700000002,click,,surplus\n" + GOOD,
         reasons={"extra_fields": 1}, accepted=2),
    Case("extra_fields_int.csv", HEADER + "1,2,1700000000,click,\n3,4,1700000001,click,1,2,3,4\n",
         args=["id_type=int"], reasons={"extra_fields": 1}, accepted=1),
    Case("trailing_separator.csv", HEADER + "u1,i1,1700000000,click,1,\nu2,i2,1700000100,buy,,\n",
         reasons={}, accepted=2),  # an empty field past the last column is not data
    Case("short_rows.csv", HEADER + "u3,i3\nu4,i4,1700000000\n" + GOOD,
         reasons={"missing_timestamp": 1, "missing_event_type": 1}, accepted=2),
    Case("quoted_header_comma.csv",
         'user_id,item_id,timestamp,event_type,"notes, free text"\nu1,i1,1700000000,click,"a, b"\n'
         "u2,i2,1700000001,click,plain\n", reasons={}, accepted=2),
    Case("quoted_header.csv", '"user_id","item_id","timestamp","event_type"\n"u1","i1","1700000000","click"\n',
         reasons={}, accepted=1),
    Case("unbalanced_quote.csv", HEADER + GOOD + '"u3,i3,1700000002,click,\n' + "u4,i4,1700000003,click,\n",
         reasons={"malformed_row": 1}, accepted=3),
    Case("unbalanced_quote_mid_field.csv", HEADER + 'u3,i"3,1700000002,click,\n' + GOOD,
         reasons={"malformed_row": 1}, accepted=2),
    Case("unbalanced_quote_int.csv", HEADER + '1,2,1700000000,click,\n"3,4,1700000001,click,\n5,6,1700000002,click,\n',
         args=["id_type=int"], reasons={"malformed_row": 1}, accepted=2),
    Case("quote_closed_lines_later.csv", HEADER + '"u3,i3,1700000002,click,\nu4,i4,1700000003,click,"\n' + GOOD,
         reasons={"malformed_row": 1}, accepted=2),  # the reader joins the two lines into one row
    Case("escaped_quotes.csv", HEADER + '"u""1",i1,1700000000,click,\n' + GOOD, reasons={}, accepted=3),
    Case("duplicate_header.csv", "user_id,item_id,timestamp,event_type,user_id\nu1,i1,1700000000,click,u2\n",
         error="column 'user_id' appears 2 times in the header"),
    Case("duplicate_unused_header.csv",
         "user_id,item_id,timestamp,event_type,note,note\nu1,i1,1700000000,click,a,b\n", reasons={}, accepted=1),
    Case("missing_column.csv", "user_id,item_id,timestamp\nu1,i1,1700000000\n",
         error="missing required column(s) ['event_type']"),
    Case("empty.csv", "", error="empty file"),
    Case("blank_only.csv", "\n\n \n", error="only blank lines"),
    Case("header_only.csv", HEADER, error="header only"),
    Case("all_rows_bad.csv", HEADER + ",i1,1700000000,click,\nu1,,1700000000,click,\n",
         reasons={"missing_user_id": 1, "missing_item_id": 1}, accepted=0),
    # ---- generic CSV: values -----------------------------------------------------------------------------
    Case("inf_nan_value.csv", HEADER + "u1,i1,1700000000,click,inf\nu1,i2,1700000000,click,nan\n"
         "u1,i3,1700000000,click,-Infinity\nu1,i4,1700000000,click,NaN\n" + GOOD,
         reasons={"bad_value": 4}, accepted=2),
    Case("inf_nan_ids.csv", HEADER + "inf,1,1700000000,click,\n1,nan,1700000000,click,\n1,2,1700000000,click,\n",
         args=["id_type=int"], reasons={"bad_user_id": 1, "bad_item_id": 1}, accepted=1),
    Case("inf_nan_timestamp.csv", HEADER + "u1,i1,inf,click,\nu1,i2,nan,click,\nu1,i3,1.7e9,click,\n" + GOOD,
         reasons={"bad_timestamp": 3}, accepted=2),
    Case("negative_huge_timestamp.csv", HEADER + "u1,i1,-1,click,\nu1,i2,0,click,\nu1,i3,99999999999,click,\n"
         "u1,i4,99999999999999999999999,click,\n" + GOOD,
         reasons={"timestamp_out_of_range": 3, "bad_timestamp": 1}, accepted=2),
    Case("iso_times.csv", "user_id,item_id,timestamp,event_type\nu1,i1,2024-01-01T00:00:00Z,click\n"
         "u1,i2,not a time,click\nu1,i3,1800-01-01T00:00:00Z,click\n", args=["timestamp_format=iso"],
         reasons={"bad_timestamp": 1, "timestamp_out_of_range": 1}, accepted=1),
    # ---- other text kinds --------------------------------------------------------------------------------
    Case("extra_field.tsv", HEADER.replace(",", "\t") + "u1\ti1\t1700000000\tclick\t\tx\n"
         + GOOD.replace(",", "\t"), reasons={"extra_fields": 1}, accepted=2),
    Case("extra_field.csv.gz", _gz((HEADER + GOOD + "u3,i3,1700000002,click,1,2\n").encode()),
         reasons={"extra_fields": 1}, accepted=2),
    Case("truncated.csv.gz", _gz((HEADER + GOOD * 50).encode())[:60], error="cannot decompress"),
    Case("not_gzip.csv.gz", HEADER + GOOD, error="cannot decompress"),
    Case("bom.ndjson", "\ufeff" + NDJSON_GOOD * 2, reasons={}, accepted=1, rows_read=2),  # one repeat
    Case("nan_value.ndjson", NDJSON_GOOD + json.dumps({"user_id": "u2", "item_id": "i2", "timestamp": 1700000000,
                                                       "event_type": "click", "value": float("nan")}) + "\n"
         + json.dumps({"user_id": "u3", "item_id": "i3", "timestamp": 1700000000, "event_type": "click",
                       "value": "inf"}) + "\n",
         reasons={"malformed_row": 1, "bad_value": 1}, accepted=1),  # NaN is not JSON; "inf" is no value
    Case("garbage_line.ndjson", NDJSON_GOOD + "{oops\n\n", reasons={"malformed_row": 1, "empty_row": 1}, accepted=1),
    Case("array.ndjson", "[1, 2]\n", error="first line is not a JSON object"),
    # ---- sasrec, taobao, movielens -----------------------------------------------------------------------
    Case("sasrec_extra.txt", "1 2\n1 2 3 4\n2 3\n", args=["--format", "sasrec"],
         reasons={"extra_fields": 1}, accepted=2),
    Case("sasrec_first_row_extra.txt", "1 2 3 4\n1 2\n", args=["--format", "sasrec"],
         reasons={"extra_fields": 1}, accepted=1),
    Case("sasrec_trailing_space_bom_crlf.txt", "\ufeff1 2 \r\n2 3\r\n", args=["--format", "sasrec"],
         reasons={}, accepted=2),
    Case("sasrec_one_field.txt", "1\n2\n", args=["--format", "sasrec"], error="expects 2 fields"),
    Case("taobao_extra.csv", "1,2,3,pv,1511544070\n1,2,3,pv,1511544071,surplus\n", args=["--format", "taobao"],
         reasons={"extra_fields": 1}, accepted=1),
    Case("taobao_quote.csv", '1,2,3,pv,1511544070\n"1,2,3,pv,1511544071\n', args=["--format", "taobao"],
         reasons={"malformed_row": 1}, accepted=1),
    Case("taobao_inf.csv", "1,2,3,pv,inf\n1,2,3,pv,1511544071\n", args=["--format", "taobao"],
         reasons={"bad_timestamp": 1}, accepted=1),
    Case("ratings.dat", "1::1193::5::978300760\n1::661::3::978302109::9\n2:1193::4::978300000\n",
         args=["--format", "movielens"], reasons={"extra_fields": 1, "malformed_row": 1}, accepted=1),
    Case("u.data", "\ufeff196\t242\t3\t881250949\n186\t302\tnan\t891717742\n", args=["--format", "movielens"],
         reasons={"bad_value": 1}, accepted=1),
    # ---- parquet -----------------------------------------------------------------------------------------
    Case("datetime_ms_tz.parquet", pl.DataFrame({
        "user_id": ["u1", "u2"], "item_id": ["i1", "i2"], "event_type": ["click", "click"],
        "timestamp": pl.Series([T0, T0], dtype=pl.Datetime("ms")).dt.replace_time_zone("Asia/Tokyo")}),
        reasons={}, accepted=2),
    Case("datetime_too_old.parquet", pl.DataFrame({
        "user_id": ["u1", "u2"], "item_id": ["i1", "i2"], "event_type": ["click", "click"],
        "timestamp": [dt.datetime(1900, 1, 1), T0]}), reasons={"timestamp_out_of_range": 1}, accepted=1),
    Case("float_user_id.parquet", pl.DataFrame({
        "user_id": [1.0, 2.0, float("nan"), 1.5, float("inf")], "item_id": [1, 2, 3, 4, 5],
        "timestamp": [1700000000] * 5, "event_type": ["click"] * 5}),
        args=["id_type=int"], reasons={"bad_user_id": 3}, accepted=2),
    Case("nan_value.parquet", pl.DataFrame({
        "user_id": ["u1", "u2", "u3"], "item_id": ["i1", "i2", "i3"], "timestamp": [1700000000] * 3,
        "event_type": ["click"] * 3, "value": [1.0, float("nan"), float("-inf")]}),
        reasons={"bad_value": 2}, accepted=1),
    Case("struct_user_id.parquet", pl.DataFrame({
        "user_id": [{"a": 1}], "item_id": ["i1"], "timestamp": [1700000000], "event_type": ["click"]}),
        error="column 'user_id' (user_id) has type Struct"),
    Case("list_item_id.parquet", pl.DataFrame({
        "user_id": ["u1"], "item_id": [[1, 2]], "timestamp": [1700000000], "event_type": ["click"]}),
        error="column 'item_id' (item_id) has type List"),
    Case("time_of_day.parquet", pl.DataFrame({
        "user_id": ["u1"], "item_id": ["i1"], "timestamp": [dt.time(12, 0)], "event_type": ["click"]}),
        error="column 'timestamp' (timestamp) has type Time"),
    Case("nested_extra_column.parquet", pl.DataFrame({
        "user_id": ["u1", ""], "item_id": ["i1", "i2"], "timestamp": [1700000000] * 2,
        "event_type": pl.Series(["click", "pv"], dtype=pl.Categorical), "tags": [["a"], ["b", "c"]]}),
        reasons={"missing_user_id": 1}, accepted=1),
    Case("integer_times_iso.parquet", pl.DataFrame({
        "user_id": ["u1"], "item_id": ["i1"], "timestamp": [1700000000], "event_type": ["click"]}),
        args=["timestamp_format=iso"], error="holds numbers but timestamp_format is 'iso'"),
    Case("no_rows.parquet", pl.DataFrame(schema={"user_id": pl.String, "item_id": pl.String,
                                                 "timestamp": pl.Int64, "event_type": pl.String}),
         error="no rows"),
    Case("garbage.parquet", RANDOM_BYTES, error="not a readable Parquet file"),
    # ---- the inputs as a whole ---------------------------------------------------------------------------
    Case("twice.csv", HEADER + GOOD, inputs=["twice.csv", "twice.csv"], error="given twice"),
    Case("twice_via_link.csv", HEADER + GOOD, inputs=["twice_via_link.csv", "link/../twice_via_link.csv"],
         error="given twice"),
    Case("absent.csv", None, error="no such file"),
    Case("a_directory.csv", None, inputs=["subdir"], error="is a directory"),
]


def _write(case: Case, root: Path) -> None:
    path = root / case.name
    if isinstance(case.content, pl.DataFrame):
        case.content.write_parquet(path)
    elif isinstance(case.content, bytes):
        path.write_bytes(case.content)
    elif isinstance(case.content, str):
        path.write_bytes(case.content.encode())  # exactly these bytes: no newline translation
    (root / "subdir").mkdir(exist_ok=True)
    (root / "link").mkdir(exist_ok=True)


def _cli(root: Path, inputs: list[str], args: list[str], capsys) -> tuple[int, str, str]:
    out = root / "out"
    rc = main(["ingest", *[str(root / n) for n in inputs], "--out", str(out), *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc: int, err: str, path: str, expected: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error: ") and path in lines[0], lines[0]
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus(case: Case, tmp_path, capsys):
    _write(case, tmp_path)
    inputs = case.inputs or [case.name]
    rc, out, err = _cli(tmp_path, inputs, case.args, capsys)
    if case.error is not None:
        assert_one_line_error(rc, err, str(tmp_path / inputs[-1]), case.error)
        assert not (tmp_path / "out").exists()
        return
    assert rc == 0 and err == "", err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["rows_read"] == report["rows_accepted"] + report["rows_quarantined"] + report["rows_duplicate"]
    assert report["quarantine_by_reason"] == case.reasons
    if case.accepted is not None:
        assert report["rows_accepted"] == case.accepted
    if case.rows_read is not None:
        assert report["rows_read"] == case.rows_read
    q = pl.read_parquet(tmp_path / "out" / "quarantine.parquet")
    assert q.height == report["rows_quarantined"] and q[S.SOURCE_ROW].n_unique() == q.height
    assert set(q[S.REASON]) <= set(S.REASONS)
    for reason, fld in zip(q[S.REASON], q["field"], strict=True):
        assert fld == S.REASON_FIELD[reason]


def test_every_reason_names_its_field():
    assert set(S.REASONS) == set(S.REASON_FIELD)


def test_extra_fields_keep_the_row_verbatim_and_its_line(tmp_path):
    src = tmp_path / "log.csv"
    src.write_text(HEADER + GOOD + "u3,i3,1700000002,click,,surplus\n")
    ingest([src], tmp_path / "out", IngestConfig())
    q = pl.read_parquet(tmp_path / "out" / "quarantine.parquet")
    assert q.select(S.SOURCE_ROW, S.REASON, S.USER_ID, S.TIMESTAMP).rows() == [
        (3, "extra_fields", "u3", "1700000002")]


def test_unbalanced_quote_quarantines_only_its_row(tmp_path):
    src = tmp_path / "log.csv"
    lines = [f"u{i},i{i},{1700000000 + i},click," for i in range(1, 7)]
    lines[2] = '"u3,i3,1700000003,click,'
    src.write_text(HEADER + "\n".join(lines) + "\n")
    r = ingest([src], tmp_path / "out", IngestConfig(min_user_events=1)).report
    assert (r["rows_read"], r["rows_accepted"], r["quarantine_by_reason"]) == (6, 5, {"malformed_row": 1})
    q = pl.read_parquet(tmp_path / "out" / "quarantine.parquet")
    assert q[S.SOURCE_ROW].to_list() == [3] and q[S.USER_ID].to_list() == ['"u3']


def test_rows_read_line_by_line_keep_the_file_order(tmp_path):
    """Lines with quotes and lines without are split apart and merged back: ties keep the file order."""
    src = tmp_path / "log.csv"
    rows = ['u1,a,1700000000,click,', '"u1","b",1700000000,click,', "u1,c,1700000000,click,",
            '"u1",d,"1700000000",click,', "u1,e,1700000000,click,,surplus", '"u1",f,1700000000,"click",']
    src.write_text(HEADER + "\n".join(rows) + "\n")
    r = ingest([src], tmp_path / "out", IngestConfig()).report
    assert r["quarantine_by_reason"] == {"extra_fields": 1}
    ev = pl.read_parquet(tmp_path / "out" / "events.parquet")
    assert ev[S.ITEM_ID].to_list() == ["a", "b", "c", "d", "f"]


def test_same_file_through_a_symlink_is_refused(tmp_path):
    src = tmp_path / "log.csv"
    src.write_text(HEADER + GOOD)
    (tmp_path / "alias.csv").symlink_to(src)
    with pytest.raises(IngestError, match=r"alias\.csv: given twice \(also given as .*log\.csv\)"):
        ingest([src, tmp_path / "alias.csv"], tmp_path / "out", IngestConfig())


def test_rows_read_line_by_line_still_go_through_kcore(tmp_path):
    """k-core re-reads dropped rows from their file: in the mode that could read it."""
    src = tmp_path / "log.csv"
    src.write_text(HEADER + "u1,a,1700000001,click,\nu1,b,1700000002,click,\nu2,a,1700000003,click,,x\n"
                   "u3,c,1700000004,click,\nu4,a,1700000005,click,\nu4,b,1700000006,click,\n")
    r = ingest([src], tmp_path / "out", IngestConfig(min_user_events=2)).report
    assert r["quarantine_by_reason"] == {"extra_fields": 1, "below_min_user_events": 1}
    q = pl.read_parquet(tmp_path / "out" / "quarantine.parquet").sort(S.SOURCE_ROW)
    assert q.select(S.SOURCE_ROW, S.USER_ID).rows() == [(3, "u2"), (4, "u3")]


# ---- item 3: every temporal Parquet dtype reads as the same instant ----------------------------------------
@pytest.mark.parametrize("dtype", [
    *[pl.Datetime(unit, zone) for unit in ("ns", "us", "ms") for zone in (None, "UTC", "America/New_York")],
    pl.Date, pl.Int64, pl.Int32, pl.Float64, pl.String,
], ids=str)
def test_parquet_temporal_dtypes(tmp_path, dtype):
    instants = [dt.datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC), dt.datetime(2017, 11, 26, tzinfo=dt.UTC)]
    ts = pl.Series(instants, dtype=pl.Datetime("us", "UTC"))
    expected = ts
    fmt = "epoch_s"
    if isinstance(dtype, pl.Datetime):
        ts = ts.cast(pl.Datetime(dtype.time_unit, "UTC"))
        ts = ts.dt.convert_time_zone(dtype.time_zone) if dtype.time_zone else ts.dt.replace_time_zone(None)
    elif dtype == pl.Date:
        ts = ts.dt.date()
        expected = ts.cast(pl.Datetime("us", "UTC"))
    elif dtype == pl.String:
        ts, fmt = ts.dt.to_string("%Y-%m-%dT%H:%M:%S%.f%z"), "iso"
    else:  # whole seconds since the epoch
        ts = ts.dt.epoch("s").cast(dtype)
        expected = pl.from_epoch(ts.cast(pl.Int64), "s").dt.replace_time_zone("UTC").cast(pl.Datetime("us", "UTC"))
    src = tmp_path / "log.parquet"
    pl.DataFrame({"user_id": ["u1", "u1"], "item_id": ["a", "b"], "timestamp": ts,
                  "event_type": ["click", "click"]}).write_parquet(src)
    r = ingest([src], tmp_path / "out", IngestConfig(timestamp_format=fmt)).report
    assert r["quarantine_by_reason"] == {} and r["rows_accepted"] == 2
    ev = pl.read_parquet(tmp_path / "out" / "events.parquet")
    assert ev[S.TIMESTAMP].dtype == S.TIMESTAMP_DTYPE
    assert sorted(ev[S.TIMESTAMP].to_list()) == sorted(expected.to_list())


def test_parquet_datetime_outside_the_window_is_out_of_range(tmp_path):
    src = tmp_path / "log.parquet"
    pl.DataFrame({"user_id": ["u1", "u1"], "item_id": ["a", "b"], "event_type": ["click", "click"],
                  "timestamp": pl.Series([dt.datetime(2017, 11, 26, 12), dt.datetime(2018, 6, 1)],
                                         dtype=pl.Datetime("ns"))}).write_parquet(src)
    r = ingest([src], tmp_path / "out", IngestConfig(max_time="2018-01-01T00:00:00+00:00")).report
    assert r["quarantine_by_reason"] == {"timestamp_out_of_range": 1} and r["rows_accepted"] == 1


# ---- files that cannot be read -----------------------------------------------------------------------------
@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_a_one_line_error(tmp_path, capsys):
    src = tmp_path / "locked.csv"
    src.write_text(HEADER + GOOD)
    src.chmod(0)
    try:
        rc, _, err = _cli(tmp_path, ["locked.csv"], [], capsys)
    finally:
        src.chmod(0o644)
    assert_one_line_error(rc, err, str(src), "cannot read")


def test_read_errors_become_ingest_errors(tmp_path, monkeypatch):
    """The path above, as root too: any OSError while opening a file names the file."""
    import recsys_pretrain.data.formats as formats

    def refuse(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    src = tmp_path / "locked.csv"
    src.write_text(HEADER + GOOD)
    monkeypatch.setattr(formats, "check_utf8", refuse)
    with pytest.raises(IngestError, match=r"locked\.csv: cannot read: Permission denied"):
        ingest([src], tmp_path / "out", IngestConfig())


def test_an_open_quote_in_any_field_never_hides_rows_in_an_accepted_value(tmp_path):
    """A quote left open in an optional column (category): that row is malformed, the lines after it are
    rows of their own, and no accepted value spans lines."""
    import polars as pl

    from recsys_pretrain.config import IngestConfig
    from recsys_pretrain.data.ingest import ingest

    p = tmp_path / "e.csv"
    p.write_text('user_id,item_id,timestamp,event_type,category_id\n'
                 'u1,i1,1700000000,click,"cat\n'
                 'carol-secret,i2,1700000001,click,c2\n'
                 'u3,i3,1700000002,click,c3\n')
    r = ingest([p], tmp_path / "out", IngestConfig()).report
    assert r["rows_read"] == r["rows_accepted"] + r["rows_quarantined"] + r["rows_duplicate"]
    events = pl.read_parquet(tmp_path / "out" / "events.parquet")
    assert not any("\n" in str(v) for row in events.rows() for v in row)
    assert sorted(events["user_id"]) == ["carol-secret", "u3"]
    assert r["quarantine_by_reason"] == {"malformed_row": 1}
