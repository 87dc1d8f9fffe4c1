"""Source formats: where each canonical column lives in a file, and how to scan the file lazily.

Every scan yields the source columns as text (nothing is coerced on read, so a bad value reaches the
quarantine exactly as it was written), plus `source_row`, the 1-based data row in the file.
File-level problems raise `IngestError` naming the file (and, for columns, what was found).
"""

from __future__ import annotations

import codecs
import gzip
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from recsys_pretrain import schema as S


class IngestError(ValueError):
    """A file cannot be ingested at all (as opposed to a bad row, which is quarantined)."""


@dataclass(frozen=True)
class FormatSpec:
    name: str
    columns: dict[str, str]  # canonical column -> source column (absent canonical columns are not in the source)
    names: tuple[str, ...] | None = None  # column names of a headerless file; None = the file has a header
    separator: str | None = None  # None = from the file extension
    quote_char: str | None = '"'
    id_type: str = "int"  # "int" | "str"
    timestamp_format: str | None = "epoch_s"  # None = the format carries no time, order is the file order
    default_event_type: str | None = None  # the event type of every row when the source has no event column
    min_time: str | None = None  # the valid time window of this source, when it is known
    max_time: str | None = None


def _identity(cols: tuple[str, ...]) -> dict[str, str]:
    return {c: c for c in cols}


FORMATS: dict[str, FormatSpec] = {
    # MovieLens 100K `u.data`: tab-separated, no header. Variants (ratings.csv, ratings.dat) in _movielens_variant.
    "movielens": FormatSpec(
        name="movielens",
        columns={S.USER_ID: "user_id", S.ITEM_ID: "item_id", S.VALUE: "rating", S.TIMESTAMP: "timestamp"},
        names=("user_id", "item_id", "rating", "timestamp"),
        separator="\t",
        default_event_type="rating",
    ),
    # `user item` per line, each user's items in time order, no timestamps (SASRec / BERT4Rec files).
    "sasrec": FormatSpec(
        name="sasrec",
        columns={S.USER_ID: "user_id", S.ITEM_ID: "item_id"},
        names=("user_id", "item_id"),
        separator=" ",
        quote_char=None,
        timestamp_format=None,
        default_event_type="click",
    ),
    # Alibaba UserBehavior.csv; its official window is 2017-11-25..2017-12-03 in Beijing time.
    "taobao": FormatSpec(
        name="taobao",
        columns={
            S.USER_ID: "user_id",
            S.ITEM_ID: "item_id",
            S.CATEGORY_ID: "category_id",
            S.EVENT_TYPE: "behavior_type",
            S.TIMESTAMP: "timestamp",
        },
        names=("user_id", "item_id", "category_id", "behavior_type", "timestamp"),
        separator=",",
        min_time="2017-11-25T00:00:00+08:00",
        max_time="2017-12-04T00:00:00+08:00",
    ),
    # RetailRocket events.csv: header timestamp,visitorid,event,itemid,transactionid; milliseconds.
    "retailrocket": FormatSpec(
        name="retailrocket",
        columns={S.USER_ID: "visitorid", S.ITEM_ID: "itemid", S.EVENT_TYPE: "event", S.TIMESTAMP: "timestamp"},
        separator=",",
        timestamp_format="epoch_ms",
    ),
}


def generic_spec(columns: dict[str, str], id_type: str, timestamp_format: str) -> FormatSpec:
    """A file with a header whose columns are named by config (canonical name -> source name)."""
    unknown = set(columns) - set(S.CANONICAL_COLUMNS)
    if unknown:
        raise IngestError(f"generic format: unknown canonical column(s) {sorted(unknown)}; valid: {S.CANONICAL_COLUMNS}")
    mapping = {**_identity(S.CANONICAL_COLUMNS), **columns}
    return FormatSpec(name="generic", columns=mapping, id_type=id_type, timestamp_format=timestamp_format)


def _movielens_variant(path: Path, first_line: str) -> FormatSpec:
    """MovieLens ships three layouts: u.data (tab), ratings.dat (`::`), ratings.csv (header)."""
    base = FORMATS["movielens"]
    if "::" in first_line:
        # `::` is two separators with an empty field between them; polars takes one-byte separators.
        names = ("user_id", "_sep1", "item_id", "_sep2", "rating", "_sep3", "timestamp")
        return FormatSpec(**{**base.__dict__, "names": names, "separator": ":"})
    if first_line.lower().startswith("userid"):
        cols = {S.USER_ID: "userId", S.ITEM_ID: "movieId", S.VALUE: "rating", S.TIMESTAMP: "timestamp"}
        return FormatSpec(**{**base.__dict__, "columns": cols, "names": None, "separator": ","})
    return base


@dataclass
class Source:
    """One input file, ready to scan."""

    path: Path  # as the user named it (used in every message)
    spec: FormatSpec
    kind: str  # csv | parquet | ndjson
    read_path: Path  # the file actually scanned (a decompressed copy for .gz)
    raw_columns: list[str] = field(default_factory=list)
    estimated_rows: int = 0  # exact for Parquet; from the size for text (an overestimate for usual rows)

    def typed_columns(self) -> dict[str, pl.DataType]:
        """Source columns that may be parsed as numbers by the reader itself (the fast path)."""
        spec, out = self.spec, {}
        if spec.id_type == "int":
            out.update({spec.columns[c]: pl.Int64 for c in (S.USER_ID, S.ITEM_ID)})
        if spec.timestamp_format in ("epoch_s", "epoch_ms", "epoch_us"):
            out[spec.columns[S.TIMESTAMP]] = pl.Int64
        if S.VALUE in spec.columns:
            out[spec.columns[S.VALUE]] = pl.Float64
        return {k: v for k, v in out.items() if k in self.raw_columns}

    def scan(self, typed: bool = False) -> pl.LazyFrame:
        """Source columns plus `source_row` (1-based). Text, unless `typed` (CSV: ids, epoch times and
        values parsed by the reader, failing on the first bad value) or the file carries types (Parquet)."""
        if self.kind == "parquet":
            return pl.scan_parquet(self.read_path).with_row_index(S.SOURCE_ROW, offset=1)
        if self.kind == "ndjson":
            # One text column per line, fields pulled out with JSON paths: a malformed line yields nulls
            # (and is quarantined) instead of failing the whole file.
            line = pl.col("_line")
            lf = pl.scan_csv(
                self.read_path, has_header=False, separator="\x1f", quote_char=None,
                new_columns=["_line"], infer_schema=False, empty_string_is_null=False,
            )
            fields = [line.str.json_path_match(f"$['{c}']").alias(c) for c in self.raw_columns]
            # A blank line counts as parsed (it is quarantined as an empty row); anything else must be JSON.
            parsed_ok = (line.is_null() | line.str.json_path_match("$").is_not_null()).alias("_json_ok")
            return lf.with_row_index(S.SOURCE_ROW, offset=1).select(S.SOURCE_ROW, *fields, parsed_ok)
        lf = pl.scan_csv(
            self.read_path,
            has_header=self.spec.names is None,
            new_columns=list(self.spec.names) if self.spec.names else None,
            separator=self.spec.separator or ",",
            quote_char=self.spec.quote_char,
            infer_schema=False,
            schema_overrides=self.typed_columns() if typed else None,
            truncate_ragged_lines=True,
            encoding="utf8",
        )
        return lf.with_row_index(S.SOURCE_ROW, offset=1)


def _kind_of(path: Path) -> tuple[str, str | None]:
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    ext = suffixes[-1] if suffixes else ""
    if ext in (".parquet", ".pq"):
        return "parquet", None
    if ext in (".ndjson", ".jsonl", ".json"):
        return "ndjson", None
    if ext in (".tsv", ".tab"):
        return "csv", "\t"
    return "csv", None


def check_utf8(path: Path, shown: Path) -> None:
    """Stream-decode the file; name the line of the first byte that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                bad = offset + exc.start
                with open(path, "rb") as again:
                    line += again.read(bad).count(b"\n") - (line - 1)
                raise IngestError(f"{shown}: not valid UTF-8 at byte {bad} (line {line}); re-encode the file") from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise IngestError(f"{shown}: not valid UTF-8 (truncated character at the end)") from None


def _first_lines(path: Path, n: int = 2) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        out = []
        for raw in fh:
            if raw.strip():
                out.append(raw.rstrip("\r\n"))
            if len(out) >= n:
                break
    return out


def _estimate_rows(path: Path, sample: int = 1 << 20) -> int:
    """Rows of a text file, from the line length of its first MiB (10% margin): enough to pick a path."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(sample)
    lines = max(head.count(b"\n"), 1)
    return int(size / (len(head) / lines) * 1.1) + 1


def open_source(path: str | Path, spec: FormatSpec, workdir: Path) -> Source:
    """Check a file can be ingested with `spec` and return a `Source` for it, or raise IngestError."""
    shown = Path(path)
    if not shown.exists():
        raise IngestError(f"{shown}: no such file")
    if shown.is_dir():
        raise IngestError(f"{shown}: is a directory, expected a file")
    if shown.stat().st_size == 0:
        raise IngestError(f"{shown}: empty file")
    read_path = shown
    if shown.suffix.lower() == ".gz":
        # Polars scans plain files lazily; a streaming decompression keeps memory flat.
        read_path = workdir / f"{len(list(workdir.iterdir()))}-{shown.stem}"
        try:
            with gzip.open(shown, "rb") as src, open(read_path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        except (OSError, EOFError) as exc:
            raise IngestError(f"{shown}: cannot decompress: {exc}") from None
    kind, sep = _kind_of(shown)
    if spec.name == "movielens" and kind == "csv":
        lines = _first_lines(read_path, 1)
        spec = _movielens_variant(shown, lines[0] if lines else "")
    if sep is not None and spec.separator is None:
        spec = FormatSpec(**{**spec.__dict__, "separator": sep})
    required = [spec.columns[c] for c in (S.USER_ID, S.ITEM_ID) if c in spec.columns]
    if spec.timestamp_format is not None:
        required.append(spec.columns[S.TIMESTAMP])
    if spec.default_event_type is None:
        required.append(spec.columns[S.EVENT_TYPE])

    if kind == "parquet":
        try:
            found = list(pl.read_parquet_schema(read_path))
            n_rows = pl.scan_parquet(read_path).select(pl.len()).collect().item()
        except Exception as exc:  # polars raises several types for a corrupt file
            raise IngestError(f"{shown}: not a readable Parquet file: {exc}") from None
        if n_rows == 0:
            raise IngestError(f"{shown}: no rows")
    else:
        # Encoding is checked by the scan itself (Polars refuses invalid UTF-8); check_utf8 then names the line.
        lines = _first_lines(read_path, 2)
        if not lines:
            raise IngestError(f"{shown}: empty file (only blank lines)")
        if kind == "ndjson":
            import json

            try:
                first = json.loads(lines[0])
            except json.JSONDecodeError as exc:
                raise IngestError(f"{shown}: first line is not JSON: {exc}") from None
            if not isinstance(first, dict):
                raise IngestError(f"{shown}: first line is not a JSON object")
            found = list(first)
            # Columns may be absent on the first line yet present later; those we need are always read.
            found = found + [c for c in required if c not in found]
        elif spec.names is not None:
            n_fields = len(lines[0].split(spec.separator or ","))
            found = list(spec.names)
            if n_fields < len(spec.names) and spec.name != "movielens":
                raise IngestError(
                    f"{shown}: format {spec.name!r} expects {len(spec.names)} fields {list(spec.names)}, "
                    f"the first row has {n_fields}: {lines[0][:200]!r}"
                )
        else:
            header = lines[0]
            found = [h.strip().strip('"') for h in header.split(spec.separator or ",")]
            if len(lines) < 2:
                raise IngestError(f"{shown}: header only, no data rows (columns: {found})")
    missing = [c for c in required if c not in found]
    if missing:
        raise IngestError(f"{shown}: missing required column(s) {missing}; found columns {found}")
    raw_columns = [c for c in found if not c.startswith("_sep")]
    estimated = n_rows if kind == "parquet" else _estimate_rows(read_path)
    return Source(path=shown, spec=spec, kind=kind, read_path=read_path, raw_columns=raw_columns,
                  estimated_rows=estimated)
