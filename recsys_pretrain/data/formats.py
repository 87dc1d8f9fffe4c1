"""Source formats: where each canonical column lives in a file, and how to scan the file lazily.

Every scan yields the source columns as text (nothing is coerced on read, so a bad value reaches the
quarantine exactly as it was written), plus `source_row`, the 1-based data row in the file.
File-level problems raise `IngestError` naming the file (and, for columns, what was found).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
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


# Row-level flags a scan may add beside the source columns (see `_parse` in ingest.py).
MALFORMED = "_malformed"  # the row's structure is broken (unbalanced quote, not JSON, ...)
EXTRA = "_extra"  # the row has more non-empty fields than the file has columns

# Scan modes, tried in this order for delimited text: the first that reads the whole file is used.
#   typed: ids, epoch times and values parsed by the reader (fast; fails on the first bad value)
#   text:  every field as text, bad values quarantined row by row
#   lines: one line at a time, split by an expression: rows with extra fields or broken quotes are
#          flagged (and quarantined) instead of failing the whole file. Slower, so only a fallback.
SCAN_MODES = ("typed", "text", "lines")


@dataclass
class Source:
    """One input file, ready to scan."""

    path: Path  # as the user named it (used in every message)
    spec: FormatSpec
    kind: str  # csv | parquet | ndjson
    read_path: Path  # the file actually scanned (a decompressed copy for .gz)
    raw_columns: list[str] = field(default_factory=list)
    estimated_rows: int = 0  # exact for Parquet; from the size for text (an overestimate for usual rows)
    file_columns: list[str] = field(default_factory=list)  # csv: every column of the file, in order
    header_line: int | None = None  # csv: 0-based line of the header (blank lines may precede it)
    mode: str = "text"  # the scan mode that read the file (set by ingest)

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

    def scan(self, mode: str = "text") -> pl.LazyFrame:
        """Source columns plus `source_row` (1-based). Text, except in `typed` mode (CSV, see SCAN_MODES)
        or where the file carries types (Parquet). A mode that cannot read the file fails on collect."""
        if self.kind == "parquet":
            lf = pl.scan_parquet(self.read_path)
            schema = lf.collect_schema()
            # Dictionary and all-null columns are text to the validation; decimals are numbers.
            casts = [pl.col(c).cast(pl.Float64 if isinstance(schema[c], pl.Decimal) else pl.String)
                     for c in self.raw_columns
                     if isinstance(schema[c], (pl.Categorical, pl.Enum, pl.Decimal)) or schema[c] == pl.Null]
            return (lf.with_columns(casts) if casts else lf).with_row_index(S.SOURCE_ROW, offset=1)
        if self.kind == "ndjson":
            # One text column per line, fields pulled out with JSON paths: a malformed line yields nulls
            # (and is quarantined) instead of failing the whole file.
            line = pl.col("_line").str.strip_chars_start("\ufeff")
            lf = pl.scan_csv(
                self.read_path, has_header=False, separator="\x1f", quote_char=None,
                new_columns=["_line"], infer_schema=False, empty_string_is_null=False,
            )
            fields = [line.str.json_path_match(f"$['{c}']").alias(c) for c in self.raw_columns]
            # A blank line counts as parsed (it is quarantined as an empty row); anything else must be JSON.
            blank = line.str.strip_chars().str.len_bytes() == 0
            malformed = (~blank & line.str.json_path_match("$").is_null()).alias(MALFORMED)
            return lf.with_row_index(S.SOURCE_ROW, offset=1).select(S.SOURCE_ROW, *fields, malformed)
        if mode == "lines":
            return self._scan_lines()
        # truncate_ragged_lines=False: a row with more fields than columns fails this scan (and the
        # file is read in `lines` mode) instead of losing its extra fields silently.
        lf = pl.scan_csv(
            self.read_path,
            has_header=self.header_line is not None,
            new_columns=self.file_columns,
            separator=self.spec.separator or ",",
            quote_char=self.spec.quote_char,
            infer_schema=False,
            schema_overrides=self.typed_columns() if mode == "typed" else None,
            truncate_ragged_lines=False,
            encoding="utf8",
        )
        return lf.with_row_index(S.SOURCE_ROW, offset=1)

    def _scan_lines(self) -> pl.LazyFrame:
        """Each line split into fields by an expression. Quoted fields are honoured within a line (a
        field quoted across lines is broken, and flagged); a field with an unbalanced quote, or text
        after a closing quote, flags the row as malformed; non-empty fields past the file's columns
        flag it as having extra fields. Row numbers are line numbers after the header."""
        lf = pl.scan_lines(self.read_path, name="_line")
        if self.header_line is not None:
            lf = lf.slice(self.header_line + 1)
        lf = lf.with_row_index(S.SOURCE_ROW, offset=1).with_columns(pl.col("_line").str.strip_chars_start("\ufeff"))
        quote = self.spec.quote_char
        if quote is None:
            return self._split_lines(lf, quoted=False)
        # Lines without a quote split at every separator (fast); the others go through a CSV-aware
        # pattern. Both halves keep the line order, so merging them restores the file's order.
        has_quote = pl.col("_line").str.contains(quote, literal=True)
        return self._split_lines(lf.filter(~has_quote), quoted=False).merge_sorted(
            self._split_lines(lf.filter(has_quote), quoted=True), key=S.SOURCE_ROW)

    def _split_lines(self, lf: pl.LazyFrame, quoted: bool) -> pl.LazyFrame:
        sep, quote = self.spec.separator or ",", self.spec.quote_char or '"'
        line = pl.col("_line")
        if not quoted:
            tokens, malformed = line.str.split(sep), pl.lit(False)
        else:
            s, q = (f"\\x{{{ord(c):x}}}" for c in (sep, quote))
            # A field: quoted (doubled quotes inside) or plain; each after the line start or a separator.
            found = line.str.extract_all(f"(?:^|{s})(?:{q}(?:[^{q}]|{q}{q})*{q}|[^{s}{q}]*)")
            # Whatever the fields do not cover (a stray or unbalanced quote) makes the row malformed; its
            # fields are then shown split at every separator, quotes and all.
            malformed = found.list.eval(pl.element().str.len_bytes()).list.sum() != line.str.len_bytes()
            # Every found field but the first starts with its separator.
            tokens = pl.when(malformed).then(line.str.split(sep)).otherwise(
                found.list.eval(pl.element().str.strip_prefix(sep)))
        lf = lf.select(S.SOURCE_ROW, tokens.alias("_tokens"), malformed.alias(MALFORMED))

        def field_at(i: int) -> pl.Expr:
            raw = pl.col("_tokens").list.get(i, null_on_oob=True)
            if not quoted:
                return pl.when(raw != "").then(raw)
            # A found field is quoted whole or holds no quote: unquote by stripping one quote at each end
            # and undoubling. As the CSV reader does, an empty field is missing, a quoted empty one is "".
            text = raw.str.strip_prefix(quote).str.strip_suffix(quote).str.replace_all(quote * 2, quote, literal=True)
            return pl.when(raw == "").then(None).when(pl.col(MALFORMED)).then(raw).otherwise(text)

        past_columns = pl.col("_tokens").list.slice(len(self.file_columns))
        extra = past_columns.list.eval(pl.element().str.strip_chars().str.len_bytes() > 0).list.any()
        fields = [field_at(i).alias(c) for i, c in enumerate(self.file_columns)]
        return lf.select(S.SOURCE_ROW, *fields, pl.col(MALFORMED), extra.fill_null(False).alias(EXTRA))


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


def check_utf8(path: Path, shown: Path, limit: int | None = None) -> None:
    """Stream-decode the file (its first `limit` bytes); name the line of the first byte that is not UTF-8,
    or of the first NUL byte (binary data, not text)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0

    def line_of(byte: int) -> int:
        with open(path, "rb") as again:
            return again.read(byte).count(b"\n") + 1

    with open(path, "rb") as fh:
        while chunk := fh.read(min(1 << 22, limit or 1 << 22)):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                bad = offset + exc.start
                raise IngestError(f"{shown}: not valid UTF-8 at byte {bad} (line {line_of(bad)}); "
                                  "re-encode the file") from None
            if (nul := chunk.find(b"\x00")) >= 0:
                bad = offset + nul
                raise IngestError(f"{shown}: a NUL byte at byte {bad} (line {line_of(bad)}): binary data, "
                                  "not a text file") from None
            offset += len(chunk)
            if limit is not None and offset >= limit:
                return  # a character may continue past the sample
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise IngestError(f"{shown}: not valid UTF-8 (truncated character at the end)") from None


def _first_lines(path: Path, n: int = 2) -> list[tuple[int, str]]:
    """The first `n` non-blank lines as (0-based line number, text), a byte-order mark removed. Lines
    end at \\n only, as the CSV reader's do."""
    out = []
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh):
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if i == 0:
                text = text.removeprefix("\ufeff")
            if text.strip():
                out.append((i, text))
            if len(out) >= n:
                break
    return out


def _split_line(line: str, spec: FormatSpec) -> list[str]:
    """The fields of one line as the CSV reader sees them (quotes honoured)."""
    sep = spec.separator or ","
    if spec.quote_char is None:
        return line.split(sep)
    return next(csv.reader([line], delimiter=sep, quotechar=spec.quote_char, strict=False))


def _show(columns: list[str], limit: int = 300) -> str:
    text = repr(columns)  # repr: control characters are escaped, the message stays one line
    return text if len(text) <= limit else text[:limit] + "..."


def one_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message: Polars appends hints and query plans after it."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first if len(first) <= limit else first[:limit] + "..."


def _header_columns(header: str, spec: FormatSpec, shown: Path) -> list[str]:
    """Column names from the header line. Names are stripped; an empty name becomes `column_<n>`; a
    column the format reads may appear once only, other repeated names get a `_<k>` suffix."""
    names = [h.strip() or f"column_{i + 1}" for i, h in enumerate(_split_line(header, spec))]
    used = set(spec.columns.values())
    out: list[str] = []
    for name in names:
        if name in out:
            if name in used:
                raise IngestError(f"{shown}: column {name!r} appears {names.count(name)} times in the header; "
                                  "it must appear once")
            k = 2
            while f"{name}_{k}" in names or f"{name}_{k}" in out:
                k += 1
            name = f"{name}_{k}"
        out.append(name)
    return out


# What each canonical column may hold in a typed (Parquet) file, by dtype group (see _dtype_group).
_ALLOWED_DTYPES = {
    S.USER_ID: {"integer", "float", "text"},
    S.ITEM_ID: {"integer", "float", "text"},
    S.TIMESTAMP: {"integer", "float", "text", "datetime", "date"},
    S.EVENT_TYPE: {"integer", "text"},
    S.VALUE: {"integer", "float", "text", "boolean"},
    S.SESSION_ID: {"integer", "float", "text", "boolean", "datetime", "date"},
    S.CATEGORY_ID: {"integer", "float", "text", "boolean", "datetime", "date"},
}


def _dtype_group(dtype: pl.DataType) -> str:
    if dtype.is_integer():
        return "integer"
    if dtype.is_float() or isinstance(dtype, pl.Decimal):
        return "float"
    if dtype == pl.String or dtype == pl.Null or isinstance(dtype, (pl.Categorical, pl.Enum)):
        return "text"
    if isinstance(dtype, pl.Datetime):
        return "datetime"
    if dtype == pl.Date:
        return "date"
    if dtype == pl.Boolean:
        return "boolean"
    return "other"  # nested, binary, time of day, duration, ...


def _check_parquet_schema(schema: pl.Schema, spec: FormatSpec, shown: Path) -> list[str]:
    """Refuse a column the format reads that holds the wrong kind of data; return the columns to keep
    (those that can be shown as text in the quarantine)."""
    for canonical, column in spec.columns.items():
        if column not in schema:
            continue
        group = _dtype_group(schema[column])
        if group not in _ALLOWED_DTYPES[canonical]:
            raise IngestError(f"{shown}: column {column!r} ({canonical}) has type {schema[column]}; expected "
                              f"{' or '.join(sorted(_ALLOWED_DTYPES[canonical]))}")
        if canonical == S.TIMESTAMP and group in ("integer", "float") and spec.timestamp_format not in (
                "epoch_s", "epoch_ms", "epoch_us"):
            raise IngestError(f"{shown}: column {column!r} (timestamp) holds numbers but timestamp_format is "
                              f"{spec.timestamp_format!r}; use epoch_s, epoch_ms or epoch_us")
    return [c for c, dtype in schema.items() if _dtype_group(dtype) != "other"]


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
    try:
        return _open_source(shown, spec, workdir)
    except OSError as exc:  # unreadable (permissions), vanished, an I/O error
        raise IngestError(f"{shown}: cannot read: {exc.strerror or one_line(exc)}") from None


def _open_source(shown: Path, spec: FormatSpec, workdir: Path) -> Source:
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
            raise IngestError(f"{shown}: cannot decompress: {one_line(exc)}") from None
    kind, sep = _kind_of(shown)
    if kind != "parquet":
        check_utf8(read_path, shown, limit=1 << 16)  # binary or mis-encoded files stop here, with the line
    if spec.name == "movielens" and kind == "csv":
        lines = _first_lines(read_path, 1)
        spec = _movielens_variant(shown, lines[0][1] if lines else "")
    if sep is not None and spec.separator is None:
        spec = FormatSpec(**{**spec.__dict__, "separator": sep})
    required = [spec.columns[c] for c in (S.USER_ID, S.ITEM_ID) if c in spec.columns]
    if spec.timestamp_format is not None:
        required.append(spec.columns[S.TIMESTAMP])
    if spec.default_event_type is None:
        required.append(spec.columns[S.EVENT_TYPE])

    file_columns: list[str] = []
    header_line = None
    if kind == "parquet":
        try:
            schema = pl.read_parquet_schema(read_path)
            n_rows = pl.scan_parquet(read_path).select(pl.len()).collect().item()
        except Exception as exc:  # polars raises several types for a corrupt file
            raise IngestError(f"{shown}: not a readable Parquet file: {one_line(exc)}") from None
        if n_rows == 0:
            raise IngestError(f"{shown}: no rows")
        found = list(schema)
    else:
        # The scan checks the encoding of the rest (Polars refuses invalid UTF-8); check_utf8 then names the line.
        head = _first_lines(read_path, 2)
        lines = [text for _, text in head]
        if not lines:
            raise IngestError(f"{shown}: empty file (only blank lines)")
        if kind == "ndjson":
            try:
                first = json.loads(lines[0])
            except json.JSONDecodeError as exc:
                raise IngestError(f"{shown}: first line is not JSON: {exc}") from None
            if not isinstance(first, dict):
                raise IngestError(f"{shown}: first line is not a JSON object")
            found = list(first)
            # Columns may be absent on the first line yet present later; those the format reads always are.
            found = found + [c for c in spec.columns.values() if c not in found]
        elif spec.names is not None:
            n_fields = len(_split_line(lines[0], spec))
            found = file_columns = list(spec.names)
            if n_fields < len(spec.names) and spec.name != "movielens":
                raise IngestError(
                    f"{shown}: format {spec.name!r} expects {len(spec.names)} fields {list(spec.names)}, "
                    f"the first row has {n_fields}: {lines[0][:200]!r}"
                )
        else:
            header_line = head[0][0]
            found = file_columns = _header_columns(lines[0], spec, shown)
            if len(lines) < 2:
                raise IngestError(f"{shown}: header only, no data rows (columns: {_show(found)})")
    missing = [c for c in required if c not in found]
    if missing:
        raise IngestError(f"{shown}: missing required column(s) {missing}; found columns {_show(found)}")
    raw_columns = [c for c in found if not c.startswith("_sep")]
    if kind == "parquet":
        raw_columns = _check_parquet_schema(schema, spec, shown)
    estimated = n_rows if kind == "parquet" else _estimate_rows(read_path)
    return Source(path=shown, spec=spec, kind=kind, read_path=read_path, raw_columns=raw_columns,
                  estimated_rows=estimated, file_columns=file_columns, header_line=header_line)
