"""Ingest behaviour logs: scan lazily, validate, quarantine bad rows, dedupe, k-core, map ids.

Every input row ends up in exactly one place, and the report proves it:
    rows_read == rows_accepted + rows_quarantined + rows_duplicate
Outputs (events.parquet, quarantine.parquet, vocab.json, report.json, report.md) appear together,
atomically: a failed run leaves the previous outputs untouched.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl

from recsys_pretrain import schema as S
from recsys_pretrain.config import IngestConfig
from recsys_pretrain.data.formats import FORMATS, FormatSpec, IngestError, Source, generic_spec, open_source
from recsys_pretrain.io import atomic_dir, write_json, write_text
from recsys_pretrain.vocab import Vocab

DEFAULT_MIN_TIME = "1990-01-01T00:00:00+00:00"
DEFAULT_MAX_TIME = "2100-01-01T00:00:00+00:00"
_EPOCH_UNITS = {"epoch_s": ("s", 1), "epoch_ms": ("ms", 1_000), "epoch_us": ("us", 1_000_000)}
_ISO_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%#z",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f%#z",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%d",
)
# Internal column names of the parsed frame.
_FILE = "_file"
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


def _timestamp_expr(raw: pl.Expr, fmt: str, lo: datetime, hi: datetime) -> tuple[pl.Expr, pl.Expr, pl.Expr]:
    """(timestamp, parsed, in range) from a text column, for any supported timestamp format."""
    if fmt in _EPOCH_UNITS:
        unit, per_s = _EPOCH_UNITS[fmt]
        n = raw.str.to_integer(strict=False)
        # Range-check the integer before converting, so absurd values cannot overflow the conversion.
        in_range = n.is_between(int(lo.timestamp()) * per_s, int(hi.timestamp()) * per_s)
        ts = pl.when(in_range).then(pl.from_epoch(n, unit)).cast(S.TIMESTAMP_DTYPE)
        return ts, n.is_not_null(), in_range
    fmts = _ISO_FORMATS if fmt == "iso" else (fmt,)
    parsed = pl.coalesce(
        [raw.str.to_datetime(format=f, strict=False, time_unit="us", time_zone="UTC") for f in fmts]
    )
    in_range = parsed.is_between(pl.lit(lo).cast(S.TIMESTAMP_DTYPE), pl.lit(hi).cast(S.TIMESTAMP_DTYPE))
    return pl.when(in_range).then(parsed), parsed.is_not_null(), in_range


def _parse(lf: pl.LazyFrame, src: Source, cfg: IngestConfig, file_idx: int) -> pl.LazyFrame:
    """Add canonical columns (prefixed `_c_`) and a `reason` (null for a valid row) to a raw scan."""
    spec = src.spec
    cols = {c: s for c, s in spec.columns.items() if s in src.raw_columns}

    def text(canonical: str) -> pl.Expr:
        if canonical not in cols:
            return pl.lit(None, dtype=pl.String)
        t = pl.col(cols[canonical]).str.strip_chars()
        return pl.when(t.str.len_bytes() > 0).then(t)  # blank text is missing, quoted or not

    def ident(canonical: str) -> pl.Expr:
        t = text(canonical)
        return t.str.to_integer(strict=False) if spec.id_type == "int" else t

    lo = _parse_time(cfg.min_time or spec.min_time or DEFAULT_MIN_TIME)
    hi = _parse_time(cfg.max_time or spec.max_time or DEFAULT_MAX_TIME)
    aliases = {**S.DEFAULT_EVENT_ALIASES, **{k.lower(): v for k, v in cfg.event_aliases.items()}}
    bad_targets = sorted(set(aliases.values()) - set(S.EVENT_TYPES))
    if bad_targets:
        raise IngestError(f"event_aliases map onto unknown event types {bad_targets}; known: {S.EVENT_TYPES}")

    if spec.timestamp_format is not None:
        ts, ts_parsed, ts_ok = _timestamp_expr(text(S.TIMESTAMP), spec.timestamp_format, lo, hi)
    else:
        ts, ts_parsed, ts_ok = pl.lit(None, dtype=S.TIMESTAMP_DTYPE), pl.lit(True), pl.lit(True)
    if S.EVENT_TYPE in cols:
        event = text(S.EVENT_TYPE).str.to_lowercase().replace_strict(aliases, default=None, return_dtype=S.EVENT_DTYPE)
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
    if src.kind == "ndjson":
        reason = pl.when(~pl.col("_json_ok")).then(pl.lit("malformed_row")).when(empty).then(pl.lit("empty_row"))
    else:
        reason = pl.when(empty).then(pl.lit("empty_row"))
    reason = (
        reason.when(text(S.USER_ID).is_null()).then(pl.lit("missing_user_id"))
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
    if S.VALUE in cols:
        reason = reason.when(text(S.VALUE).is_not_null() & pl.col("_c_value").is_null()).then(pl.lit("bad_value"))
    return lf.with_columns(reason=reason.otherwise(None), **{_FILE: pl.lit(file_idx, dtype=pl.UInt16)})


def _canonical(src: Source) -> list[pl.Expr]:
    cols = {c: s for c, s in src.spec.columns.items() if s in src.raw_columns}
    optional = [
        (pl.col(cols[c]).str.strip_chars() if c in cols else pl.lit(None, dtype=pl.String)).alias(c)
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
        *[pl.col(c) for c in src.raw_columns],
    ]


def _split_valid_invalid(sources: list[Source], cfg: IngestConfig, work: Path) -> None:
    """One streaming pass per file: valid rows (typed) and quarantined rows (as read) to Parquet."""
    for i, src in enumerate(sources):
        parsed = _parse(src.scan(), src, cfg, i)
        valid = parsed.filter(pl.col(S.REASON).is_null()).select(_canonical(src))
        bad = parsed.filter(pl.col(S.REASON).is_not_null()).select(_quarantine_columns(src, i))
        try:
            pl.collect_all(
                [
                    valid.sink_parquet(work / f"valid-{i:05d}.parquet", lazy=True),
                    bad.sink_parquet(work / f"bad-{i:05d}.parquet", lazy=True),
                ],
                engine="streaming",
            )
        except pl.exceptions.PolarsError as exc:
            raise IngestError(f"{src.path}: cannot be read as {src.spec.name}/{src.kind}: {exc}") from None


def _user_ranges(valid: pl.LazyFrame, max_rows: int) -> list[tuple[object, object]]:
    """Split users (sorted by raw id) into contiguous ranges of at most ~max_rows events each."""
    counts = valid.group_by(S.USER_ID).len().sort(S.USER_ID).collect(engine="streaming")
    if counts.is_empty():
        return []
    cum = counts["len"].cast(pl.Int64).cum_sum().to_numpy()
    cut = np.searchsorted(cum, np.arange(max_rows, cum[-1], max_rows), side="right")
    starts = np.unique(np.concatenate([[0], cut]))
    users = counts[S.USER_ID]
    bounds = []
    for k, s in enumerate(starts):
        e = starts[k + 1] - 1 if k + 1 < len(starts) else len(users) - 1
        bounds.append((users[int(s)], users[int(e)]))
    return bounds


def _sort_dedupe(valid: pl.LazyFrame, cfg: IngestConfig, has_time: bool, work: Path) -> tuple[list[Path], int]:
    """Sort by user, time, input order and drop exact repeats, one user range at a time."""
    key = [S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.EVENT_TYPE]
    parts, n_dup = [], 0
    ranges = _user_ranges(valid, cfg.partition_rows)
    for k, (lo, hi) in enumerate(ranges):
        part = valid if len(ranges) == 1 else valid.filter(pl.col(S.USER_ID).is_between(pl.lit(lo), pl.lit(hi)))
        df = part.collect(engine="streaming")
        df = df.sort([S.USER_ID, S.TIMESTAMP, *_ORDER], nulls_last=False, multithreaded=True)
        if cfg.dedupe and has_time:
            n = df.height
            df = df.filter(pl.struct(key).is_first_distinct())
            n_dup += n - df.height
        path = work / f"part-{k:05d}.parquet"
        df.write_parquet(path)
        parts.append(path)
    return parts, n_dup


def _kcore(parts: list[Path], cfg: IngestConfig) -> tuple[pl.DataFrame, int]:
    """Iteratively drop users and items below the minimum counts; return the dropped rows' keys and reasons."""
    df = pl.scan_parquet(parts).select(S.USER_ID, S.ITEM_ID, *_ORDER).collect()
    keep = np.ones(df.height, dtype=bool)
    reason = np.full(df.height, None, dtype=object)
    iterations = 0
    while True:
        iterations += 1
        cur = df.filter(pl.Series(keep))
        idx = np.flatnonzero(keep)
        removed = False
        for col, k, why in (
            (S.USER_ID, cfg.min_user_events, "below_min_user_events"),
            (S.ITEM_ID, cfg.min_item_events, "below_min_item_events"),
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


def ingest(inputs: list[str | Path], out: str | Path, cfg: IngestConfig) -> IngestResult:
    """Ingest `inputs` (all of one format) into `out`. See the module docstring for the outputs."""
    t0 = time.perf_counter()
    if not inputs:
        raise IngestError("no input files given")
    spec = resolve_spec(cfg)
    with atomic_dir(out) as stage:
        work = stage / ".work"
        work.mkdir()
        sources = [open_source(p, spec, work) for p in inputs]  # every file-level check before any work
        has_time = all(s.spec.timestamp_format is not None for s in sources)
        _split_valid_invalid(sources, cfg, work)

        valid = pl.scan_parquet(sorted(work.glob("valid-*.parquet")))
        bad_paths = sorted(work.glob("bad-*.parquet"))
        per_file = []
        for i, src in enumerate(sources):
            n_valid = pl.scan_parquet(work / f"valid-{i:05d}.parquet").select(pl.len()).collect().item()
            n_bad = pl.scan_parquet(work / f"bad-{i:05d}.parquet").select(pl.len()).collect().item()
            per_file.append({"file": str(src.path), "format": src.spec.name, "kind": src.kind,
                             "rows_read": n_valid + n_bad, "rows_quarantined_at_parse": n_bad})
        rows_read = sum(f["rows_read"] for f in per_file)

        parts, n_dup = _sort_dedupe(valid, cfg, has_time, work)
        kcore = {"min_user_events": cfg.min_user_events, "min_item_events": cfg.min_item_events,
                 "rows_removed": 0, "iterations": 0}
        events = pl.scan_parquet(parts) if parts else valid.head(0)
        quarantine_parts = [pl.scan_parquet(p) for p in bad_paths]
        if parts and (cfg.min_user_events > 1 or cfg.min_item_events > 1):
            dropped, iterations = _kcore(parts, cfg)
            kcore.update(rows_removed=dropped.height, iterations=iterations)
            if dropped.height:
                events = events.join(dropped.lazy().select(*_ORDER), on=list(_ORDER), how="anti",
                                     maintain_order="left")
                # Re-read the dropped rows as written in their files, so the quarantine keeps them verbatim.
                for i, src in enumerate(sources):
                    mine = dropped.filter(pl.col(_FILE) == i).drop(_FILE)
                    if mine.height:
                        raw = src.scan().with_columns(pl.col(S.SOURCE_ROW).cast(pl.UInt64))
                        raw = raw.join(mine.lazy(), on=S.SOURCE_ROW, how="inner")
                        quarantine_parts.append(raw.select(_quarantine_columns(src, i)))

        # The vocab comes from the accepted events only, so every index in events.parquet is known to it.
        ids = events.select(S.USER_ID, S.ITEM_ID).collect(engine="streaming")
        vocab = Vocab.from_ids(ids[S.USER_ID], ids[S.ITEM_ID])
        del ids
        final = events.with_columns(
            vocab.user_index_expr(S.USER_ID).alias(S.USER_IDX),
            vocab.item_index_expr(S.ITEM_ID).alias(S.ITEM_IDX),
        ).select(*S.CANONICAL_COLUMNS, S.USER_IDX, S.ITEM_IDX)
        final.sink_parquet(stage / "events.parquet", engine="streaming")
        vocab.save(stage / "vocab.json")

        quarantine = (
            pl.concat(quarantine_parts, how="diagonal_relaxed")
            if quarantine_parts
            else pl.LazyFrame(schema={S.SOURCE_FILE: pl.String, S.SOURCE_ROW: pl.UInt64, S.REASON: pl.String})
        )
        quarantine.sink_parquet(stage / "quarantine.parquet", engine="streaming")

        report = _report(stage, cfg, per_file, rows_read, n_dup, kcore, vocab, has_time, inputs)
        report["seconds"] = round(time.perf_counter() - t0, 3)
        if report["rows_read"] != report["rows_accepted"] + report["rows_quarantined"] + report["rows_duplicate"]:
            raise AssertionError(f"row accounting broken: {report}")  # a bug, never bad input
        write_json(stage / "report.json", report)
        write_text(stage / "report.md", report_markdown(report))
        import shutil

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
    return {
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
