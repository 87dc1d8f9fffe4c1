"""Ingest behaviour logs: scan lazily, validate, quarantine bad rows, dedupe, k-core, map ids.

Every input row ends up in exactly one place, and the report proves it:
    rows_read == rows_accepted + rows_quarantined + rows_duplicate
Outputs (events.parquet, quarantine.parquet, vocab.json, report.json, report.md) appear together,
atomically: a failed run leaves the previous outputs untouched.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl

from recsys_pretrain import privacy
from recsys_pretrain import schema as S
from recsys_pretrain.config import IngestConfig
from recsys_pretrain.data.formats import (
    EXTRA,
    FORMATS,
    MALFORMED,
    SCAN_MODES,
    FormatSpec,
    IngestError,
    Source,
    check_utf8,
    generic_spec,
    one_line,
    open_source,
)
from recsys_pretrain.io import atomic_dir, write_json, write_text
from recsys_pretrain.vocab import Vocab

DEFAULT_MIN_TIME = "1990-01-01T00:00:00+00:00"
DEFAULT_MAX_TIME = "2100-01-01T00:00:00+00:00"
_EPOCH_UNITS = {"epoch_s": "s", "epoch_ms": "ms", "epoch_us": "us"}
_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_ISO_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%#z",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f%#z",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%d",
)
# Internal column names of the parsed frame.
_FILE = "_file"
# lz4 writes about twice as fast as zstd here for files ~1.6x larger; every Parquet reader reads it.
PARQUET_COMPRESSION = "lz4"
_ORDER = (_FILE, S.SOURCE_ROW)


@dataclass(frozen=True)
class IngestResult:
    out_dir: Path
    report: dict

    @property
    def events(self) -> Path:
        return self.out_dir / "events.parquet"


def resolve_spec(cfg: IngestConfig) -> FormatSpec:
    if cfg.format == "generic":
        return generic_spec(cfg.columns, cfg.id_type, cfg.timestamp_format)
    if cfg.format not in FORMATS:
        raise IngestError(f"unknown format {cfg.format!r}; known: ['generic', {', '.join(map(repr, FORMATS))}]")
    return FORMATS[cfg.format]


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _epoch_bounds(lo: datetime, hi: datetime, unit: str) -> tuple[int, int]:
    """The time window as integers since the epoch in `unit` ("d" = days), within Int64."""
    if unit == "d":
        return -(-int(lo.timestamp()) // 86_400), int(hi.timestamp()) // 86_400
    limit = 2**63 - 1
    per_s = _PER_SECOND[unit]
    return max(int(lo.timestamp()) * per_s, -limit), min(int(hi.timestamp()) * per_s, limit)


def _timestamp_expr(
    raw: pl.Expr, dtype: pl.DataType, fmt: str, lo: datetime, hi: datetime
) -> tuple[pl.Expr, pl.Expr, pl.Expr]:
    """(timestamp, parsed, in range) from a text, number or temporal column. A temporal column (Parquet)
    is read in its own unit and time zone, whatever `fmt` says; text and numbers as `fmt` says."""
    if isinstance(dtype, pl.Datetime) or dtype == pl.Date or fmt in _EPOCH_UNITS:
        if isinstance(dtype, pl.Datetime):  # stored as an instant since the epoch in its unit, any zone
            unit, n = dtype.time_unit, raw.to_physical()
        elif dtype == pl.Date:
            unit, n = "d", raw.to_physical().cast(pl.Int64)
        else:
            unit = _EPOCH_UNITS[fmt]
            n = raw.str.to_integer(strict=False) if dtype == pl.String else raw.cast(pl.Int64, strict=False)
        # Range-check the integer before converting, so absurd values cannot overflow the conversion.
        in_range = n.is_between(*_epoch_bounds(lo, hi, unit))
        ts = pl.when(in_range).then(pl.from_epoch(n, unit)).cast(S.TIMESTAMP_DTYPE)
        return ts, n.is_not_null(), in_range
    if dtype != pl.String:
        raw = raw.cast(pl.String)
    fmts = _ISO_FORMATS if fmt == "iso" else (fmt,)
    parsed = pl.coalesce(
        [raw.str.to_datetime(format=f, strict=False, time_unit="us", time_zone="UTC") for f in fmts]
    )
    in_range = parsed.is_between(pl.lit(lo).cast(S.TIMESTAMP_DTYPE), pl.lit(hi).cast(S.TIMESTAMP_DTYPE))
    return pl.when(in_range).then(parsed), parsed.is_not_null(), in_range


def _event_expr(raw: pl.Expr, aliases: dict[str, str]) -> pl.Expr:
    """Source event names -> canonical Enum, null when unknown. A when/then chain, one branch per
    canonical type: `replace` would stop Polars' streaming engine and hold the whole input in memory."""
    expr = None
    for target in S.EVENT_TYPES:
        names = sorted(k for k, v in aliases.items() if v == target)
        if names:
            expr = (pl.when(raw.is_in(names)) if expr is None else expr.when(raw.is_in(names))).then(pl.lit(target))
    return expr.otherwise(None).cast(S.EVENT_DTYPE)


def _parse(lf: pl.LazyFrame, src: Source, cfg: IngestConfig, file_idx: int) -> pl.LazyFrame:
    """Add canonical columns (prefixed `_c_`) and a `reason` (null for a valid row) to a raw scan."""
    spec = src.spec
    cols = {c: s for c, s in spec.columns.items() if s in src.raw_columns}
    dtypes = lf.collect_schema()

    def is_text(canonical: str) -> bool:
        return canonical not in cols or dtypes[cols[canonical]] == pl.String

    def text(canonical: str) -> pl.Expr:
        """The raw value, null when missing; text is stripped (typed columns come from a typed scan)."""
        if canonical not in cols:
            return pl.lit(None, dtype=pl.String)
        if not is_text(canonical):
            return pl.col(cols[canonical])
        t = pl.col(cols[canonical]).str.strip_chars()
        return pl.when(t.str.len_bytes() > 0).then(t)  # blank text is missing, quoted or not

    def ident(canonical: str) -> pl.Expr:
        t = text(canonical)
        if is_text(canonical):
            return t.str.to_integer(strict=False) if spec.id_type == "int" else t
        if dtypes[cols[canonical]].is_float():  # ids written as floats (pandas, with gaps): whole numbers only
            t = pl.when(t.is_finite() & (t == t.floor())).then(t.cast(pl.Int64, strict=False))
        return t.cast(pl.Int64, strict=False) if spec.id_type == "int" else t.cast(pl.String)

    lo = _parse_time(cfg.min_time or spec.min_time or DEFAULT_MIN_TIME)
    hi = _parse_time(cfg.max_time or spec.max_time or DEFAULT_MAX_TIME)
    aliases = {**S.DEFAULT_EVENT_ALIASES, **{k.lower(): v for k, v in cfg.event_aliases.items()}}
    bad_targets = sorted(set(aliases.values()) - set(S.EVENT_TYPES))
    if bad_targets:
        raise IngestError(f"event_aliases map onto unknown event types {bad_targets}; known: {S.EVENT_TYPES}")

    if spec.timestamp_format is not None:
        ts_dtype = dtypes[cols[S.TIMESTAMP]] if S.TIMESTAMP in cols else pl.String
        ts, ts_parsed, ts_ok = _timestamp_expr(text(S.TIMESTAMP), ts_dtype, spec.timestamp_format, lo, hi)
    else:
        ts, ts_parsed, ts_ok = pl.lit(None, dtype=S.TIMESTAMP_DTYPE), pl.lit(True), pl.lit(True)
    if S.EVENT_TYPE in cols:
        event = _event_expr(text(S.EVENT_TYPE).str.to_lowercase(), aliases)
    else:
        event = pl.lit(spec.default_event_type).cast(S.EVENT_DTYPE)

    lf = lf.with_columns(
        _c_user=ident(S.USER_ID),
        _c_item=ident(S.ITEM_ID),
        _c_ts=ts,
        _c_ts_parsed=ts_parsed,
        _c_ts_ok=ts_ok,
        _c_event=event,
        _c_value=text(S.VALUE).cast(pl.Float64, strict=False),
    )
    mapped = [pl.col(s) for s in cols.values()]
    empty = pl.all_horizontal([m.is_null() for m in mapped])
    # Broken structure: flagged by the scan, a separator column of `::` files that holds a value, or a
    # line break in any field read (a quote left open until a later line swallows the lines between: the
    # swallowed rows, ids included, must not be accepted as one value).
    broken = [pl.col(MALFORMED)] if MALFORMED in dtypes else []
    broken += [pl.col(c).is_not_null() for c in dtypes.names() if c.startswith("_sep")]
    broken += [pl.col(s).str.contains("\n", literal=True).fill_null(False)
               for c, s in cols.items() if is_text(c)]
    reason = pl.when(pl.any_horizontal(broken) if broken else pl.lit(False)).then(pl.lit("malformed_row"))
    if EXTRA in dtypes:
        reason = reason.when(pl.col(EXTRA)).then(pl.lit("extra_fields"))
    reason = (
        reason.when(empty).then(pl.lit("empty_row"))
        .when(text(S.USER_ID).is_null()).then(pl.lit("missing_user_id"))
        .when(text(S.ITEM_ID).is_null()).then(pl.lit("missing_item_id"))
        .when(pl.col("_c_user").is_null()).then(pl.lit("bad_user_id"))
        .when(pl.col("_c_item").is_null()).then(pl.lit("bad_item_id"))
    )
    if spec.timestamp_format is not None:
        reason = (
            reason.when(text(S.TIMESTAMP).is_null()).then(pl.lit("missing_timestamp"))
            .when(~pl.col("_c_ts_parsed")).then(pl.lit("bad_timestamp"))
            .when(~pl.col("_c_ts_ok")).then(pl.lit("timestamp_out_of_range"))
        )
    if S.EVENT_TYPE in cols:
        reason = (
            reason.when(text(S.EVENT_TYPE).is_null()).then(pl.lit("missing_event_type"))
            .when(pl.col("_c_event").is_null()).then(pl.lit("unknown_event_type"))
        )
    if S.VALUE in cols:  # not a number, or not a finite one (nan, inf)
        value_ok = pl.col("_c_value").is_finite().fill_null(False)
        reason = reason.when(text(S.VALUE).is_not_null() & ~value_ok).then(pl.lit("bad_value"))
    return lf.with_columns(reason=reason.otherwise(None), **{_FILE: pl.lit(file_idx, dtype=pl.UInt16)})


def _canonical(src: Source) -> list[pl.Expr]:
    cols = {c: s for c, s in src.spec.columns.items() if s in src.raw_columns}
    optional = [
        (pl.col(cols[c]).cast(pl.String).str.strip_chars() if c in cols else pl.lit(None, dtype=pl.String)).alias(c)
        for c in (S.SESSION_ID, S.CATEGORY_ID)
    ]
    return [
        pl.col("_c_user").alias(S.USER_ID),
        pl.col("_c_item").alias(S.ITEM_ID),
        pl.col("_c_ts").alias(S.TIMESTAMP),
        pl.col("_c_event").alias(S.EVENT_TYPE),
        *optional,
        pl.col("_c_value").alias(S.VALUE),
        pl.col(_FILE),
        pl.col(S.SOURCE_ROW).cast(pl.UInt64),
    ]


def _quarantine_columns(src: Source, file_idx: int) -> list[pl.Expr]:
    return [
        pl.lit(str(src.path)).alias(S.SOURCE_FILE),
        pl.col(S.SOURCE_ROW).cast(pl.UInt64),
        pl.col(S.REASON),
        pl.col(S.REASON).replace_strict(S.REASON_FIELD, default=None, return_dtype=pl.String).alias("field"),
        *[pl.col(c).cast(pl.String) for c in src.raw_columns],
    ]


def _split_valid_invalid(
    sources: list[Source], cfg: IngestConfig, work: Path, in_memory: bool
) -> tuple[pl.LazyFrame, list[int]]:
    """One pass per file: quarantined rows (as read) stream to Parquet; valid rows (typed) are kept in
    memory when the inputs are small enough, else streamed to Parquet too. Returns the valid rows and
    the count of valid rows per file."""
    frames, counts = [], []
    for i, src in enumerate(sources):
        # Typed first: Polars' own number parser is much faster than text -> integer. A file with any
        # value that does not parse fails that scan, and is read again as text, where the bad rows are
        # found one by one and quarantined; a file with rows the CSV reader cannot split (extra fields,
        # broken quotes) fails that too, and is read line by line, where those rows are quarantined.
        modes = SCAN_MODES if src.kind == "csv" else ("text",)
        for mode in modes:
            valid_path = work / f"valid-{i:05d}.parquet"
            try:
                parsed = _parse(src.scan(mode), src, cfg, i)
                valid = parsed.filter(pl.col(S.REASON).is_null()).select(_canonical(src))
                bad = parsed.filter(pl.col(S.REASON).is_not_null()).select(_quarantine_columns(src, i))
                if in_memory:  # one read of the input: the shared scan is materialised anyway
                    out = pl.collect_all([valid, bad.sink_parquet(work / f"bad-{i:05d}.parquet", lazy=True)],
                                         engine="streaming")
                else:  # two streaming reads: sinks that share one scan would buffer the whole input
                    valid.sink_parquet(valid_path, engine="streaming")
                    bad.sink_parquet(work / f"bad-{i:05d}.parquet", engine="streaming")
                src.mode = mode
                break
            except pl.exceptions.PolarsError as exc:
                if mode == modes[-1]:
                    if src.kind != "parquet":
                        check_utf8(src.read_path, src.path)  # the usual cause; names the line
                    raise IngestError(f"{src.path}: cannot be read as {src.spec.name}/{src.kind}: "
                                      f"{one_line(exc)}") from None
            except OSError as exc:  # the file became unreadable, or the work directory is full
                raise IngestError(f"{src.path}: {one_line(exc)}") from None
        if in_memory:
            frames.append(out[0])
            counts.append(out[0].height)
        else:
            frames.append(pl.scan_parquet(valid_path))
            counts.append(pl.scan_parquet(valid_path).select(pl.len()).collect().item())
    valid_all = pl.concat([f.lazy() for f in frames]) if in_memory else pl.concat(frames)
    return valid_all, counts


def _vocab_of(events: pl.LazyFrame) -> Vocab:
    users = events.select(pl.col(S.USER_ID).unique()).collect(engine="streaming").to_series()
    items = events.select(pl.col(S.ITEM_ID).unique()).collect(engine="streaming").to_series()
    return Vocab.from_ids(users, items)


def _index_of(raw: pl.Series, ids: pl.Series, offset: int) -> pl.Series:
    """Dense index (position in the sorted `ids` + offset) of every raw id, as UInt32.

    Integer ids that span a modest range go through a lookup table (one gather); others through a
    hash join. Both are exact; the table is just faster.
    """
    if raw.dtype.is_integer() and len(ids):
        lo, hi = int(ids[0]), int(ids[-1])
        if hi - lo < max(64 * len(ids), 1 << 24):
            lut = np.zeros(hi - lo + 1, dtype=np.uint32)
            lut[ids.to_numpy() - lo] = np.arange(offset, len(ids) + offset, dtype=np.uint32)
            return pl.Series(lut[raw.to_numpy() - lo])
    table = pl.DataFrame({"id": ids, "idx": pl.int_range(offset, len(ids) + offset, dtype=pl.UInt32, eager=True)})
    return pl.DataFrame({"id": raw}).join(table, on="id", how="left", maintain_order="left")["idx"]


def _add_index(df: pl.DataFrame, vocab: Vocab) -> pl.DataFrame:
    return df.with_columns(
        _index_of(df[S.USER_ID], vocab.users, 0).alias(S.USER_IDX),
        _index_of(df[S.ITEM_ID], vocab.items, 1).alias(S.ITEM_IDX),
    )


def _sort_events(df: pl.DataFrame) -> pl.DataFrame:
    """Sort by user, then time; ties keep input order (rows arrive in input order, the sort is stable).

    Logs are often written user by user already: checking that is one vectorised pass, a sort is many.
    """
    u, t = pl.col(S.USER_IDX), pl.col(S.TIMESTAMP).to_physical().fill_null(0)  # no times: file order
    ordered = (u > u.shift(1)) | ((u == u.shift(1)) & (t >= t.shift(1)))
    if df.height < 2 or df.select(ordered.slice(1).all()).item():
        return df
    return df.sort([S.USER_IDX, S.TIMESTAMP], nulls_last=False, maintain_order=True)


def _user_ranges(valid: pl.LazyFrame, vocab: Vocab, max_rows: int) -> list[tuple[object, object]]:
    """Contiguous ranges of raw user ids (in vocab order) holding at most ~max_rows events each."""
    counts = valid.group_by(S.USER_ID).len().sort(S.USER_ID).collect(engine="streaming")
    cum = counts["len"].cast(pl.Int64).cum_sum().to_numpy()  # users in vocab order: both are sorted ids
    cuts = np.searchsorted(cum, np.arange(max_rows, cum[-1], max_rows), side="right")
    starts = np.unique(np.concatenate([[0], cuts]))
    ends = np.append(starts[1:], vocab.n_users) - 1
    return [(vocab.users[int(lo)], vocab.users[int(hi)]) for lo, hi in zip(starts, ends, strict=True)]


def _repeats(df: pl.DataFrame) -> np.ndarray:
    """Row numbers of exact repeats of (user, item, timestamp, event_type), the first in input order kept.

    `df` is sorted by user, time, input order, so repeats sit in runs of one user and one timestamp.
    Rows in such runs get one 64-bit key (run number, item, event type); a stable sort of the keys,
    nearly sorted already, puts repeats side by side with the first occurrence in front.
    """
    u, t = pl.col(S.USER_IDX), pl.col(S.TIMESTAMP)
    new_run = ~((u == u.shift(1)) & (t == t.shift(1))).fill_null(False)
    in_run = ~new_run | ~new_run.shift(-1, fill_value=True)
    flags = df.select(new_run.alias("new"), in_run.alias("in")).to_numpy()
    candidates = np.flatnonzero(flags[:, 1])
    if len(candidates) == 0:
        return candidates
    run = np.cumsum(flags[:, 0])[candidates].astype(np.uint64)  # (n_candidates,)
    item = df[S.ITEM_IDX].to_numpy()[candidates].astype(np.uint64)
    event = df[S.EVENT_TYPE].to_physical().to_numpy()[candidates].astype(np.uint64)
    if run.max() < 2**32 and item.max() < 2**29:
        key = (run << np.uint64(32)) | (item << np.uint64(3)) | event
        order = np.argsort(key, kind="stable")
        k = key[order]
        repeat = np.zeros(len(k), dtype=bool)
        repeat[1:] = k[1:] == k[:-1]
        dup = candidates[order[repeat]]
    else:  # catalogues beyond 2^29 items: hash the columns instead
        first = pl.DataFrame({"r": run, "i": item, "e": event}).select(
            pl.struct("r", "i", "e").is_first_distinct()).to_series().to_numpy()
        dup = candidates[~first]
    return dup


def _sort_dedupe(
    valid: pl.LazyFrame, vocab: Vocab, cfg: IngestConfig, has_time: bool, path: Path, columns: list[str],
    in_memory: bool,
) -> int:
    """Write the valid rows with their indices to `path`, sorted by user, time, input order, minus exact
    repeats; return the number of repeats. Large inputs go one user range at a time (bounded memory)."""
    ranges = [None] if in_memory or vocab.n_users == 0 else _user_ranges(valid, vocab, cfg.partition_rows)
    n_dup, parts = 0, []
    for k, bounds in enumerate(ranges):
        part = valid if bounds is None else valid.filter(
            pl.col(S.USER_ID).is_between(pl.lit(bounds[0]), pl.lit(bounds[1])))
        df = _sort_events(_add_index(part.collect(engine="streaming"), vocab))
        parts.append(path.with_name(f"{path.stem}-{k:05d}.parquet"))
        dup = _repeats(df) if cfg.dedupe and has_time else np.zeros(0, dtype=np.int64)
        n_dup += len(dup)
        if len(dup):  # drop them while writing (streamed), not by copying the whole frame first
            keep = np.ones(df.height, dtype=bool)
            keep[dup] = False
            df.lazy().filter(pl.Series(keep)).select(columns).sink_parquet(parts[-1], compression=PARQUET_COMPRESSION)
        else:
            df.select(columns).write_parquet(parts[-1], compression=PARQUET_COMPRESSION)
        del df
    if len(parts) == 1:
        parts[0].rename(path)
    else:  # a streaming concatenation of the user ranges, already in order
        pl.scan_parquet(parts).sink_parquet(path, engine="streaming", compression=PARQUET_COMPRESSION)
    return n_dup


def _kcore(path: Path, cfg: IngestConfig) -> tuple[pl.DataFrame, int]:
    """Iteratively drop users and items below the minimum counts; return the dropped rows' keys and reasons."""
    df = pl.scan_parquet(path).select(S.USER_IDX, S.ITEM_IDX, *_ORDER).collect()
    keep = np.ones(df.height, dtype=bool)
    reason = np.full(df.height, None, dtype=object)
    iterations = 0
    while True:
        iterations += 1
        cur = df.filter(pl.Series(keep))
        idx = np.flatnonzero(keep)
        removed = False
        for col, k, why in (
            (S.USER_IDX, cfg.min_user_events, "below_min_user_events"),
            (S.ITEM_IDX, cfg.min_item_events, "below_min_item_events"),
        ):
            if k <= 1:
                continue
            counts = cur.select(pl.col(col).len().over(col)).to_series().to_numpy()
            drop = counts < k
            if drop.any():
                keep[idx[drop]] = False
                reason[idx[drop]] = why
                cur = df.filter(pl.Series(keep))
                idx = np.flatnonzero(keep)
                removed = True
        if not removed:
            break
    dropped = df.select(*_ORDER).filter(pl.Series(~keep)).with_columns(
        pl.Series(S.REASON, reason[~keep], dtype=pl.String)
    )
    return dropped, iterations


def _percentiles(lengths: pl.Series) -> dict:
    if lengths.is_empty():
        return {}
    qs = {"min": 0.0, "p5": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95, "p99": 0.99, "max": 1.0}
    out = {k: float(lengths.quantile(q, "nearest")) for k, q in qs.items()}
    out["mean"] = float(lengths.mean())
    return out


def _refuse_repeated_inputs(inputs: list[str | Path]) -> None:
    """The same file named twice (or through a link) would count its rows twice."""
    seen: dict[object, Path] = {}
    for p in map(Path, inputs):
        try:
            st = p.stat()
            key: object = (st.st_dev, st.st_ino)
        except OSError:  # missing or unreadable: open_source says which
            key = p.resolve()
        if key in seen:
            same = "" if str(seen[key]) == str(p) else f" (also given as {seen[key]})"
            raise IngestError(f"{p}: given twice{same}; each input file may be given once")
        seen[key] = p


def pseudonymise_quarantine(quarantine: pl.LazyFrame, sources: list, user_key: bytes, id_type: str) -> pl.LazyFrame:
    """Privacy for a quarantine: its raw user column holds the tokens too, and so does its other raw text
    wherever it may hold other rows' ids: every field of a malformed row or one with extra fields, and any
    value spanning lines (an open quote swallowed later rows)."""
    user_columns = sorted({s.spec.columns[S.USER_ID] for s in sources if S.USER_ID in s.spec.columns})
    quarantine = privacy.pseudonymise_columns(quarantine, user_columns, user_key, id_type)
    keep = {S.SOURCE_FILE, S.SOURCE_ROW, S.REASON, "field", *user_columns}
    text_columns = [c for c, t in quarantine.collect_schema().items() if c not in keep and t == pl.String]
    broken = pl.col(S.REASON).is_in(list(privacy.BROKEN_ROW_REASONS))
    return privacy.pseudonymise_raw_text(quarantine, text_columns, user_key, broken, id_type)


def ingest(inputs: list[str | Path], out: str | Path, cfg: IngestConfig, force: bool = False) -> IngestResult:
    """Ingest `inputs` (all of one format) into `out`. See the module docstring for the outputs.
    `out` may not hold an input; an existing `out` is replaced only if this project wrote it, or `force`."""
    t0 = time.perf_counter()
    if not inputs:
        raise IngestError("no input files given")
    spec = resolve_spec(cfg)
    _refuse_repeated_inputs(inputs)
    user_key = privacy.key_from_config(cfg)  # privacy: checked before any work; never stored or logged
    with atomic_dir(out, inputs=inputs, force=force) as stage:
        work = stage / ".work"
        work.mkdir()
        sources = [open_source(p, spec, work) for p in inputs]  # every file-level check before any work
        has_time = all(s.spec.timestamp_format is not None for s in sources)
        # Small inputs stay in memory between the passes; large ones go through Parquet in user ranges.
        in_memory = sum(src.estimated_rows for src in sources) <= cfg.in_memory_rows
        valid, n_valid_per_file = _split_valid_invalid(sources, cfg, work, in_memory)
        if user_key is not None:  # privacy: tokens replace raw user ids before anything is indexed or written
            spill = None if in_memory else work / "tokens.parquet"
            valid = privacy.pseudonymise_frame(valid, S.USER_ID, user_key, spill)
        bad_paths = sorted(work.glob("bad-*.parquet"))
        per_file = []
        for i, src in enumerate(sources):
            n_valid = n_valid_per_file[i]
            n_bad = pl.scan_parquet(work / f"bad-{i:05d}.parquet").select(pl.len()).collect().item()
            per_file.append({"file": str(src.path), "format": src.spec.name, "kind": src.kind,
                             "rows_read": n_valid + n_bad, "rows_quarantined_at_parse": n_bad})
        rows_read = sum(f["rows_read"] for f in per_file)

        # Repeats share their user and item with a kept row, so the vocab of the valid rows is final
        # unless k-core removes some; then it is rebuilt and the indices mapped again.
        vocab = _vocab_of(valid)
        use_kcore = cfg.min_user_events > 1 or cfg.min_item_events > 1
        final_columns = [*S.CANONICAL_COLUMNS, S.USER_IDX, S.ITEM_IDX]
        sorted_path = work / "sorted.parquet" if use_kcore else stage / "events.parquet"
        columns = final_columns + list(_ORDER) if use_kcore else final_columns
        n_dup = _sort_dedupe(valid, vocab, cfg, has_time, sorted_path, columns, in_memory)
        kcore = {"min_user_events": cfg.min_user_events, "min_item_events": cfg.min_item_events,
                 "rows_removed": 0, "iterations": 0}
        quarantine_parts = [pl.scan_parquet(p) for p in bad_paths]
        if use_kcore:
            events = pl.scan_parquet(sorted_path)
            dropped, iterations = _kcore(sorted_path, cfg)
            kcore.update(rows_removed=dropped.height, iterations=iterations)
            if dropped.height:
                events = events.join(dropped.lazy().select(*_ORDER), on=list(_ORDER), how="anti",
                                     maintain_order="left")
                vocab = _vocab_of(events)
                events = events.collect()
                events = _add_index(events.drop(S.USER_IDX, S.ITEM_IDX), vocab).lazy()  # order is kept
                # Re-read the dropped rows as written in their files, so the quarantine keeps them verbatim.
                for i, src in enumerate(sources):
                    mine = dropped.filter(pl.col(_FILE) == i).drop(_FILE)
                    if mine.height:
                        mode = "lines" if src.mode == "lines" else "text"
                        raw = src.scan(mode).with_columns(pl.col(S.SOURCE_ROW).cast(pl.UInt64))
                        raw = raw.join(mine.lazy(), on=S.SOURCE_ROW, how="inner")
                        quarantine_parts.append(raw.select(_quarantine_columns(src, i)))
            events.select(final_columns).sink_parquet(stage / "events.parquet", engine="streaming",
                                                      compression=PARQUET_COMPRESSION)
        vocab.save(stage / "vocab.json")

        quarantine = (
            pl.concat(quarantine_parts, how="diagonal_relaxed")
            if quarantine_parts
            else pl.LazyFrame(schema={S.SOURCE_FILE: pl.String, S.SOURCE_ROW: pl.UInt64, S.REASON: pl.String})
        )
        if user_key is not None:
            quarantine = pseudonymise_quarantine(quarantine, sources, user_key, spec.id_type)
        quarantine.sink_parquet(stage / "quarantine.parquet", engine="streaming")

        report = _report(stage, cfg, per_file, rows_read, n_dup, kcore, vocab, has_time, inputs)
        report["seconds"] = round(time.perf_counter() - t0, 3)
        report["user_ids"] = privacy.REPORT_NOTE if user_key is not None else "raw"  # privacy
        if report["rows_read"] != report["rows_accepted"] + report["rows_quarantined"] + report["rows_duplicate"]:
            raise AssertionError(f"row accounting broken: {report}")  # a bug, never bad input
        write_json(stage / "report.json", report)
        write_text(stage / "report.md", report_markdown(report))
        shutil.rmtree(work)
    return IngestResult(out_dir=Path(out), report=report)


def _report(stage: Path, cfg: IngestConfig, per_file: list[dict], rows_read: int, n_dup: int, kcore: dict,
            vocab: Vocab, has_time: bool, inputs: list) -> dict:
    ev = pl.scan_parquet(stage / "events.parquet")
    q = pl.scan_parquet(stage / "quarantine.parquet")
    by_reason = q.group_by(S.REASON).len().sort("len", descending=True).collect()
    q_by_file = q.group_by(S.SOURCE_FILE).len().collect()
    q_file = dict(zip(q_by_file[S.SOURCE_FILE].to_list(), q_by_file["len"].to_list(), strict=True))
    for f in per_file:
        f["rows_quarantined"] = q_file.get(f["file"], 0)
    by_type = ev.group_by(S.EVENT_TYPE).len().sort(S.EVENT_TYPE).collect()
    stats = ev.select(pl.len().alias("n"), pl.col(S.TIMESTAMP).min().alias("t0"),
                      pl.col(S.TIMESTAMP).max().alias("t1")).collect().row(0, named=True)
    lengths = ev.group_by(S.USER_IDX).len().collect()["len"]
    first = Path(inputs[0])
    name = first.name.split(".")[0] + (f"+{len(inputs) - 1}" if len(inputs) > 1 else "")
    return {
        "dataset": name,
        "format": cfg.format,
        "inputs": [str(p) for p in inputs],
        "rows_read": rows_read,
        "rows_accepted": stats["n"],
        "rows_quarantined": int(by_reason["len"].sum()),
        "rows_duplicate": n_dup,
        "quarantine_by_reason": dict(zip(by_reason[S.REASON].to_list(), by_reason["len"].to_list(), strict=True)),
        "events_by_type": {str(k): v for k, v in zip(by_type[S.EVENT_TYPE].to_list(), by_type["len"].to_list(),
                                                     strict=True)},
        "users": vocab.n_users,
        "items": vocab.n_items,
        "time_min": stats["t0"].isoformat() if stats["t0"] is not None else None,
        "time_max": stats["t1"].isoformat() if stats["t1"] is not None else None,
        "has_timestamps": has_time,
        "events_per_user": _percentiles(lengths),
        "dedupe": cfg.dedupe and has_time,
        "kcore": kcore,
        "files": per_file,
        "config": asdict(cfg),
    }


def report_markdown(r: dict) -> str:
    lines = [
        f"# Ingest report ({r['format']})",
        "",
        "| rows | count |",
        "|---|---:|",
        *[f"| {k} | {r[k]:,} |" for k in ("rows_read", "rows_accepted", "rows_quarantined", "rows_duplicate")],
        "",
        f"Users {r['users']:,}, items {r['items']:,}; time {r['time_min']} .. {r['time_max']}.",
        f"De-duplication {'on' if r['dedupe'] else 'off (no timestamps, or disabled)'}; "
        f"k-core (user >= {r['kcore']['min_user_events']}, item >= {r['kcore']['min_item_events']}) "
        f"removed {r['kcore']['rows_removed']:,} rows in {r['kcore']['iterations']} iteration(s).",
        "",
        "## Events by type",
        "",
        "| event_type | count |",
        "|---|---:|",
        *[f"| {k} | {v:,} |" for k, v in r["events_by_type"].items()],
        "",
        "## Quarantined rows by reason",
        "",
        "| reason | count |",
        "|---|---:|",
        *[f"| {k} | {v:,} |" for k, v in r["quarantine_by_reason"].items()],
        "",
        "## Events per user",
        "",
        "| " + " | ".join(r["events_per_user"]) + " |",
        "|" + "---:|" * len(r["events_per_user"]),
        "| " + " | ".join(f"{v:,.1f}" for v in r["events_per_user"].values()) + " |",
        "",
        "## Files",
        "",
        "| file | rows read | quarantined |",
        "|---|---:|---:|",
        *[f"| {f['file']} | {f['rows_read']:,} | {f['rows_quarantined']:,} |" for f in r["files"]],
        "",
    ]
    return "\n".join(lines)
