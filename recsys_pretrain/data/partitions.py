"""Partitioned, incremental ingest: one hive partition per day, ingested once, an append-only vocabulary.

A partition store (a directory this project writes) holds

    events/date=YYYY-MM-DD/part-0.parquet       valid rows of that day's inputs, de-duplicated within the day
    quarantine/date=YYYY-MM-DD/part-0.parquet   that day's quarantined rows, exactly as read (as `ingest`)
    state/date=YYYY-MM-DD.json                  the day's content hash, inputs and report: written last, so a
                                                day is ingested only once its state names its inputs' hash
    vocab.json, vocab_partitions.json           the append-only vocabulary and the days folded into it

A night's inputs are grouped by day (a `date=YYYY-MM-DD` folder above a file, or a YYYY-MM-DD in its name).
`plan` names the days whose content hash (file names and bytes, and the validation settings) differs from the
one ingested: new days and changed ones. `ingest_partition` ingests one day with ingest's own validation and
quarantine (`data/ingest.py`), so partitions can be ingested in parallel (the flow maps it on Dask); every
file is replaced by one rename (`io.atomic_path`) and the other days are never touched. `update_vocab` then
appends the ids first seen in those days: an id keeps its index forever.

Cross-partition work happens in `combine`, over a window of days read lazily (`pl.scan_parquet` of the hive
partitions): exact repeats across days (the first in day, file, row order kept), the k-core filter, the
append-only indices and the user / time sort. Its output is an ingested directory in the monolithic layout
(events.parquet, quarantine.parquet, vocab.json, report.json), so `prepare` and every later stage read it
unchanged; on the same inputs given in day order its events equal `ingest`'s row for row (raw ids; the
indices too when no id was dropped by k-core, which the append-only vocabulary keeps).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict
from datetime import date as Date
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl

from recsys_pretrain import privacy
from recsys_pretrain import schema as S
from recsys_pretrain.config import IngestConfig, from_dict
from recsys_pretrain.data.forget import MARKER as FORGOTTEN
from recsys_pretrain.data.forget import (
    _check_key,
    _marker,
    _quarantine_hits,
    _stored_ids,
    _typed,
    forgotten_markdown,
    read_marker,
)
from recsys_pretrain.data.formats import IngestError, open_source
from recsys_pretrain.data.ingest import (
    _FILE,
    PARQUET_COMPRESSION,
    _refuse_repeated_inputs,
    _report,
    _split_valid_invalid,
    pseudonymise_quarantine,
    report_markdown,
    resolve_spec,
)
from recsys_pretrain.io import (
    MARKER,
    atomic_dir,
    atomic_path,
    check_output,
    file_lock,
    sha256_file,
    write_json,
)
from recsys_pretrain.vocab import Vocab

KEY = "date"  # the hive partition key
EVENTS, QUARANTINE, STATE = "events", "quarantine", "state"
PART = "part-0.parquet"
POS = "_pos"  # a row's place in the window, in day, file, row order (input order)
_DAY_DIR = re.compile(rf"^{KEY}=(\d{{4}}-\d{{2}}-\d{{2}})$")
_DAY_NAME = re.compile(r"(\d{4}-\d{2}-\d{2})")
# settings that do not change what a day's partition holds (k-core is cross-partition, applied in `combine`)
_NOT_PER_DAY = ("min_user_events", "min_item_events", "in_memory_rows", "partition_rows")
_DEDUPE_KEY = (S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.EVENT_TYPE)
_STORED = [*S.CANONICAL_COLUMNS, _FILE, S.SOURCE_ROW]


# ---- days and hashes ------------------------------------------------------------------------------------
def day_of(path: str | Path) -> str:
    """The day a raw file belongs to: a `date=YYYY-MM-DD` folder above it, else a YYYY-MM-DD in its name."""
    p = Path(path)
    for part in reversed(p.parent.parts):
        if m := _DAY_DIR.match(part):
            return _valid_day(m.group(1), p)
    if m := _DAY_NAME.search(p.name):
        return _valid_day(m.group(1), p)
    raise IngestError(f"{p}: partitioned ingest needs the day of each input, as a date=YYYY-MM-DD folder "
                      "above it or a YYYY-MM-DD in its name")


def _valid_day(text: str, p: Path) -> str:
    try:
        return Date.fromisoformat(text).isoformat()
    except ValueError:
        raise IngestError(f"{p}: {text} is not a date") from None


def group_by_day(inputs: list[str | Path]) -> dict[str, list[str]]:
    """Inputs grouped by day, days in order, files in the order given."""
    days: dict[str, list[str]] = {}
    for p in inputs:
        days.setdefault(day_of(p), []).append(str(p))
    return dict(sorted(days.items()))


def partition_hash(files: list[str | Path], cfg: IngestConfig) -> str:
    """sha256 over each file's name and bytes, in order, and the settings that shape a day's partition."""
    h = hashlib.sha256()
    settings = {k: v for k, v in asdict(cfg).items() if k not in _NOT_PER_DAY}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for p in files:
        h.update(Path(p).name.encode())
        sha256_file(p, into=h)
    return h.hexdigest()


def events_path(store: str | Path, day: str) -> Path:
    return Path(store) / EVENTS / f"{KEY}={day}" / PART


def quarantine_path(store: str | Path, day: str) -> Path:
    return Path(store) / QUARANTINE / f"{KEY}={day}" / PART


def _state_path(store: str | Path, day: str) -> Path:
    return Path(store) / STATE / f"{KEY}={day}.json"


def read_states(store: str | Path) -> dict[str, dict]:
    """Every ingested day's state, days in order."""
    d = Path(store) / STATE
    if not d.is_dir():
        return {}
    out = {}
    for p in sorted(d.glob(f"{KEY}=*.json")):
        out[p.stem.split("=", 1)[1]] = json.loads(p.read_text())
    return out


def open_store(store: str | Path, inputs: list[str | Path] = (), force: bool = False) -> Path:
    """Create (or check) a partition store: refused when it holds an input or a directory this project did
    not write (as `atomic_dir` refuses), unless `force`."""
    store = Path(store)
    check_output(store, inputs, force)
    store.mkdir(parents=True, exist_ok=True)
    if not (store / MARKER).exists():
        write_json(store / MARKER, {"written_by": "recsys-pretrain", "kind": "partition store"})
    return store


def plan(inputs: list[str | Path], store: str | Path, cfg: IngestConfig) -> dict[str, list[str]]:
    """The days among `inputs` that this store has not ingested as they are now: new days, and days
    whose files changed (their content hash differs). Days in order."""
    states = read_states(store)
    todo = {}
    for day, files in group_by_day(inputs).items():
        state = states.get(day)
        if (state is None or state["hash"] != partition_hash(files, cfg) or not events_path(store, day).exists()
                or not quarantine_path(store, day).exists()):
            todo[day] = files
    return todo


# ---- one day ----------------------------------------------------------------------------------------------
def ingest_partition(day: str, files: list[str | Path], store: str | Path, cfg: IngestConfig,
                     force: bool = False) -> dict:
    """Ingest one day's `files` into the store's `date=<day>` partitions (events and quarantine), unless
    that day was ingested from the same bytes (then nothing is written; `force` ingests it anyway). Each file
    is published by one rename; the state file, written last, commits the day. Returns the day's state:
    `report` proves rows_read == rows_accepted + rows_quarantined + rows_duplicate for that day."""
    t0 = time.perf_counter()
    store = open_store(store, files)
    files = [str(f) for f in files]
    if not files:
        raise IngestError(f"{day}: no input files")
    digest = partition_hash(files, cfg)
    states = read_states(store)
    if (not force and day in states and states[day]["hash"] == digest and events_path(store, day).exists()
            and quarantine_path(store, day).exists()):
        return {**states[day], "skipped": True}
    spec = resolve_spec(cfg)
    _refuse_repeated_inputs(files)
    user_key = privacy.key_from_config(cfg)
    work = Path(tempfile.mkdtemp(prefix=f".work-{day}-", dir=store))
    try:
        sources = [open_source(p, spec, work) for p in files]
        has_time = all(s.spec.timestamp_format is not None for s in sources)
        in_memory = sum(src.estimated_rows for src in sources) <= cfg.in_memory_rows
        valid, n_valid_per_file = _split_valid_invalid(sources, cfg, work, in_memory)
        if user_key is not None:
            valid = privacy.pseudonymise_frame(valid, S.USER_ID, user_key, None if in_memory else work / "tok.parquet")
        df = valid.select(_STORED).collect(engine="streaming")  # one day: input order kept
        n_dup = 0
        if cfg.dedupe and has_time and df.height:
            first = first_occurrences(df)
            n_dup = df.height - int(first.sum())
            if n_dup:
                df = df.filter(first)
        df.write_parquet(work / "events.parquet", compression=PARQUET_COMPRESSION)

        parts = [pl.scan_parquet(work / f"bad-{i:05d}.parquet") for i in range(len(sources))]
        quarantine = pl.concat(parts, how="diagonal_relaxed")
        if user_key is not None:  # as `ingest` does: tokens wherever a raw user id may sit
            quarantine = pseudonymise_quarantine(quarantine, sources, user_key, spec.id_type)
        quarantine.sink_parquet(work / "quarantine.parquet", engine="streaming")

        q = pl.scan_parquet(work / "quarantine.parquet")
        by_reason = _by_reason(q)
        per_file = []
        for i, src in enumerate(sources):
            n_bad = pl.scan_parquet(work / f"bad-{i:05d}.parquet").select(pl.len()).collect().item()
            per_file.append({"file": str(src.path), "format": src.spec.name, "kind": src.kind,
                             "rows_read": n_valid_per_file[i] + n_bad, "rows_quarantined": n_bad})
        report = {
            "day": day,
            "rows_read": sum(f["rows_read"] for f in per_file),
            "rows_accepted": df.height,
            "rows_quarantined": sum(by_reason.values()),
            "rows_duplicate": n_dup,
            "has_timestamps": has_time,
            "quarantine_by_reason": by_reason,
            "files": per_file,
            "user_ids": privacy.REPORT_NOTE if user_key is not None else "raw",
        }
        if report["rows_read"] != report["rows_accepted"] + report["rows_quarantined"] + report["rows_duplicate"]:
            raise AssertionError(f"row accounting broken: {report}")  # a bug, never bad input
        state = {"day": day, "hash": digest, "inputs": files, "report": report, "config": asdict(cfg),
                 "ingested_at": time.time(), "seconds": round(time.perf_counter() - t0, 3)}
        with _store_lock(store):  # publish: each file by one rename, the state last (it commits the day)
            for src, dst in ((work / "events.parquet", events_path(store, day)),
                             (work / "quarantine.parquet", quarantine_path(store, day))):
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
            write_json(_state_path(store, day), state)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**state, "skipped": False}


def first_occurrences(df: pl.DataFrame) -> pl.Series:
    """True for each row that is not an exact repeat of an earlier row in (user, item, timestamp, event type).
    A 64-bit hash of the four finds the candidates fast; they are then compared exactly (a hash collision
    never drops a row)."""
    h = df.select(pl.struct(*_DEDUPE_KEY).hash(0)).to_series()
    repeat = ~h.is_first_distinct()
    if not repeat.any():
        return ~repeat
    suspect = h.is_in(h.filter(repeat).implode())  # every row sharing a hash with a candidate repeat
    rows = np.flatnonzero(suspect.to_numpy())
    exact = df[rows].select(pl.struct(*_DEDUPE_KEY).is_first_distinct()).to_series().to_numpy()
    keep = np.ones(df.height, dtype=bool)
    keep[rows[~exact]] = False
    return pl.Series(keep)


# ---- the vocabulary ---------------------------------------------------------------------------------------
def load_vocab(store: str | Path, id_type: str = "str") -> Vocab:
    p = Path(store) / "vocab.json"
    return Vocab.load(p) if p.exists() else Vocab.empty(id_type)


def update_vocab(store: str | Path, id_type: str = "str") -> Vocab:
    """Append the ids first seen in days not yet folded into the store's vocabulary (new or re-ingested
    days, in day order; new ids sorted among themselves). Known ids keep their index; none is removed."""
    store = Path(store)
    with file_lock(store / ".vocab.lock"):
        folded_path = store / "vocab_partitions.json"
        folded = json.loads(folded_path.read_text()) if folded_path.exists() else {}
        states = read_states(store)
        todo = [d for d, s in states.items() if folded.get(d) != s["hash"]]
        vocab = load_vocab(store, id_type)
        if todo or not (store / "vocab.json").exists():
            if todo:
                ids = pl.scan_parquet([events_path(store, d) for d in todo]).select(S.USER_ID, S.ITEM_ID)
                users = ids.select(pl.col(S.USER_ID).unique()).collect(engine="streaming").to_series()
                items = ids.select(pl.col(S.ITEM_ID).unique()).collect(engine="streaming").to_series()
                if len(vocab.users) == 0 and vocab.users.dtype != users.dtype:
                    vocab = Vocab(users=vocab.users.cast(users.dtype), items=vocab.items.cast(items.dtype))
                vocab = vocab.extend(users, items)
            vocab.save(store / "vocab.json")
            folded.update({d: states[d]["hash"] for d in todo})
            write_json(folded_path, folded)
    return vocab


# ---- retention and the window -----------------------------------------------------------------------------
def window(store: str | Path, retention_days: int | None = None) -> list[str]:
    """The ingested days a night trains on: all, or the last `retention_days` days up to the newest one."""
    days = list(read_states(store))
    if retention_days is None or not days:
        return days
    if retention_days < 1:
        raise ValueError(f"retention_days must be >= 1 or None, got {retention_days}")
    first = (Date.fromisoformat(days[-1]) - timedelta(days=retention_days - 1)).isoformat()
    return [d for d in days if d >= first]


def drop_old(store: str | Path, retention_days: int | None) -> list[str]:
    """Delete the partitions (events, quarantine, state) older than the window. Their ids stay in the
    vocabulary (indices are forever). Returns the days deleted."""
    store = Path(store)
    with _store_lock(store):
        keep = set(window(store, retention_days))
        gone = [d for d in read_states(store) if d not in keep]
        for d in gone:
            _state_path(store, d).unlink(missing_ok=True)  # first: an uncommitted day is never read
            for p in (events_path(store, d), quarantine_path(store, d)):
                shutil.rmtree(p.parent, ignore_errors=True)
    return gone


# ---- forgetting users -------------------------------------------------------------------------------------
def forget_store(store: str | Path, user_ids: list, cfg: IngestConfig, key: bytes | None = None) -> dict:
    """Remove `user_ids` (raw ids; hashed with `key` when the store was ingested with one) from every
    partition of `store`: their events and quarantined rows (as `forget` finds them in an ingested
    directory; each day's own ingest settings, kept in its state, say where a user id sits), each day's files
    replaced by one rename, its state's counts moved to `rows_forgotten` (rows_read == rows_accepted +
    rows_quarantined + rows_duplicate + rows_forgotten per day). Their vocabulary entries become null: indices
    are forever, so the slot stays and no id is left in it (also for users whose days retention deleted).

    The store's FORGOTTEN.json is written first, marked pending, and completed last: `combine` refuses a
    store with a pending forget (a forget killed midway: run it again; the rerun recounts every day from its
    files). Ingest, retention and combine wait for a running forget (they take the same lock). The marker
    changes the window key, so the next combine writes a new window, which carries it: the flow then trains
    from scratch. Days ingested later from raw logs that still hold the users bring them back (under a new
    index): purge the raw logs at their source too. Windows combined before the forget still hold the users;
    forget them with `forget` (the CLI takes the store and the windows in one call). Returns counts, never
    ids, as `forget` does, with `days_rewritten`."""
    store = Path(store)
    if not (store / STATE).is_dir():
        raise FileNotFoundError(f"{store}: no {STATE}/ directory; forget_store works on a partition store")
    user_ids = list(user_ids)
    if not user_ids:
        raise ValueError("forget: no user ids given")
    with _store_lock(store), file_lock(store / ".vocab.lock"):
        states = read_states(store)
        for day, state in states.items():
            _check_key(_state_path(store, day), state["report"].get("user_ids", "raw"), key)
        stored = _stored_ids(user_ids, key, resolve_spec(cfg).id_type)
        vocab = load_vocab(store, resolve_spec(cfg).id_type)
        dtype = (pl.scan_parquet(events_path(store, next(iter(states)))).collect_schema()[S.USER_ID] if states
                 else vocab.users.dtype)  # tokens are text whatever the raw ids' type
        typed = _typed(stored, dtype)  # as the user columns hold them
        known = [v for v in typed if v is not None]
        wanted = pl.Series(known, dtype=dtype)
        in_ev = pl.col(S.USER_ID).is_in(wanted.implode())
        in_vocab = set()
        if known and vocab.n_users and vocab.users.dtype == dtype:
            slots = vocab.user_index(wanted, strict=False)
            in_vocab = {v for v, i in zip(known, slots, strict=True) if i >= 0}
        todo, in_events, in_quarantine = {}, set(), set()
        for day, state in states.items():
            day_cfg = from_dict(IngestConfig, state["config"]) if "config" in state else cfg
            ev = pl.scan_parquet(events_path(store, day))
            found = ev.filter(in_ev).group_by(S.USER_ID).len().collect()
            q = pl.scan_parquet(quarantine_path(store, day))
            in_q, q_found = _quarantine_hits(q, day_cfg, stored, key)
            n_q = q.filter(in_q).select(pl.len()).collect().item()
            in_events |= set(found[S.USER_ID].to_list())
            in_quarantine |= q_found
            if found.height or n_q:
                todo[day] = (ev, int(found["len"].sum()), q, in_q, n_q)
        hit = [(t is not None and (t in in_events or t in in_vocab)) or (s is not None and s in in_quarantine)
               for s, t in zip(stored, typed, strict=True)]
        result = {"dir": str(store), "users_requested": len(user_ids),
                  "users_found": len({s for s, h in zip(stored, hit, strict=True) if h}),
                  "not_found": [i for i, h in enumerate(hit) if not h],
                  "events_removed": sum(t[1] for t in todo.values()),
                  "quarantine_removed": sum(t[4] for t in todo.values()),
                  "items_dropped": 0, "days_rewritten": sorted(todo), "changed": bool(todo or in_vocab)}
        old = read_marker(store)
        if not result["changed"] and not (old or {}).get("pending"):
            return result
        marker = _marker(store, result) if result["changed"] else old
        # first: from here on no night warm-starts from older weights, and no window is combined until done
        write_json(store / FORGOTTEN, {**marker, "pending": True})
        for day, (ev, _, q, in_q, _) in todo.items():
            with atomic_path(events_path(store, day)) as tmp:
                ev.filter(~in_ev).sink_parquet(tmp, compression=PARQUET_COMPRESSION)
            with atomic_path(quarantine_path(store, day)) as tmp:
                q.filter(~in_q).sink_parquet(tmp)
        for day, state in states.items():  # every day: also one a killed forget rewrote but did not count
            if _recount(store, day, state) or day in todo:
                state["forgotten"] = marker["generation"]
                write_json(_state_path(store, day), state)
        if in_vocab:
            idx = vocab.user_index(pl.Series(sorted(in_vocab), dtype=vocab.users.dtype), strict=False)
            Vocab(users=vocab.users.scatter(idx[idx >= 0], None), items=vocab.items).save(store / "vocab.json")
        write_json(store / FORGOTTEN, marker)  # last: complete
    return result


def _recount(store: Path, day: str, state: dict) -> bool:
    """Set a day's accepted and quarantined counts from its files, the difference to what was read counted
    as forgotten. Returns whether they changed."""
    rep = state["report"]
    n_ev = pl.scan_parquet(events_path(store, day)).select(pl.len()).collect().item()
    q = pl.scan_parquet(quarantine_path(store, day))
    n_q = q.select(pl.len()).collect().item()
    if (n_ev, n_q) == (rep["rows_accepted"], rep["rows_quarantined"]):
        return False
    rep.update(rows_accepted=n_ev, rows_quarantined=n_q,
               rows_forgotten=rep["rows_read"] - n_ev - n_q - rep["rows_duplicate"],
               quarantine_by_reason=_by_reason(q))
    if rep["rows_forgotten"] < 0:
        raise AssertionError(f"forget: row accounting broken for {day}")  # a bug
    return True



def _by_reason(q: pl.LazyFrame) -> dict[str, int]:
    """A quarantine's rows counted by reason, most first."""
    counts = q.group_by(S.REASON).len().sort("len", descending=True).collect()
    return dict(zip(counts[S.REASON].to_list(), counts["len"].to_list(), strict=True))

def _store_lock(store: Path):
    """Held by a forget for its whole run, and by ingest's and retention's publishing and by combine: none of
    them sees a store half rewritten by a forget."""
    return file_lock(store / ".forget.lock")


# ---- across partitions ------------------------------------------------------------------------------------
def scan_events(store: str | Path, days: list[str]) -> pl.LazyFrame:
    """The window's events, lazily: the hive partitions of `days` (with their `date` column), in day order,
    with each row's place in that order (POS)."""
    files = [str(events_path(store, d)) for d in days]
    return pl.scan_parquet(files, hive_partitioning=True).with_row_index(POS)


def _kcore(keys: pl.DataFrame, cfg: IngestConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """The k-core filter of `ingest` (users, then items, until stable) on (user_idx, item_idx) rows:
    (kept mask, reason per row, iterations)."""
    keep = np.ones(keys.height, dtype=bool)
    reason = np.full(keys.height, None, dtype=object)
    iterations = 0
    while True:
        iterations += 1
        removed = False
        for col, k, why in ((S.USER_IDX, cfg.min_user_events, "below_min_user_events"),
                            (S.ITEM_IDX, cfg.min_item_events, "below_min_item_events")):
            if k <= 1:
                continue
            idx = np.flatnonzero(keep)
            counts = keys.filter(pl.Series(keep)).select(pl.col(col).len().over(col)).to_series().to_numpy()
            drop = counts < k
            if drop.any():
                keep[idx[drop]] = False
                reason[idx[drop]] = why
                removed = True
        if not removed:
            break
    return keep, reason, iterations


def _index_ranges(lf: pl.LazyFrame, n_users: int, max_rows: int) -> list[tuple[int, int]]:
    """Contiguous user index ranges holding about `max_rows` events each."""
    counts = lf.group_by(S.USER_IDX).len().collect(engine="streaming")
    per_user = np.zeros(n_users, dtype=np.int64)
    per_user[counts[S.USER_IDX].to_numpy()] = counts["len"].to_numpy()
    cum = np.cumsum(per_user)
    cuts = np.searchsorted(cum, np.arange(max_rows, cum[-1], max_rows), side="right")
    starts = np.unique(np.concatenate([[0], cuts]))
    ends = np.append(starts[1:], n_users) - 1
    return [(int(lo), int(hi)) for lo, hi in zip(starts, ends, strict=True)]


def combine(store: str | Path, out: str | Path, cfg: IngestConfig, days: list[str] | None = None,
            force: bool = False) -> dict:
    """Write the window `days` (default: every ingested day) as one ingested directory in `ingest`'s layout:
    exact repeats across days dropped (the first in input order kept), k-core applied, indexed by the store's
    append-only vocabulary, sorted by user, time and input order. The partitions are scanned lazily; a window
    of up to `in_memory_rows` events is held in memory, a larger one goes one user range of about
    `partition_rows` events at a time (memory bounded by the range, plus 24 bytes an event for k-core).
    Returns its report (rows_read == rows_accepted + rows_quarantined + rows_duplicate over the window)."""
    store = Path(store)
    with _store_lock(store):  # never a window of days from before and after a forget
        return _combine(store, out, cfg, days, force)


def combined_window(store: str | Path, ingested_root: str | Path, cfg: IngestConfig, days: list[str]) -> Path:
    """The window `days` combined into `ingested_root/p-<window key>`: reused when that window was written
    before, else combined now; key and content are taken under one lock, so a forget cannot slip between."""
    store = Path(store)
    with _store_lock(store):
        out = Path(ingested_root) / ("p-" + window_key(store, days, cfg)[:14])
        if not (out / "report.json").exists():
            _combine(store, out, cfg, days, False)
    return out


def _combine(store: Path, out: str | Path, cfg: IngestConfig, days: list[str] | None, force: bool) -> dict:
    t0 = time.perf_counter()
    if (read_marker(store) or {}).get("pending"):
        raise IngestError(f"{store}: a forget was interrupted before it finished; run `recsys-pretrain forget` "
                          "with the same users again, then combine")
    states = read_states(store)
    days = list(states) if days is None else list(days)
    missing = [d for d in days if d not in states]
    if missing:
        raise IngestError(f"{store}: days {missing} are not ingested")
    if not days:
        raise IngestError(f"{store}: no ingested days to combine")
    vocab = update_vocab(store, resolve_spec(cfg).id_type)  # every day's ids (nothing to do when folded)
    per_file = [f for d in days for f in states[d]["report"]["files"]]
    rows_read = sum(states[d]["report"]["rows_read"] for d in days)
    dup_within = sum(states[d]["report"]["rows_duplicate"] for d in days)
    forgotten = sum(states[d]["report"].get("rows_forgotten", 0) for d in days)
    n_rows = sum(states[d]["report"]["rows_accepted"] for d in days)
    has_time = all(states[d]["report"]["has_timestamps"] for d in days)
    users = pl.DataFrame({S.USER_ID: vocab.users, S.USER_IDX: pl.int_range(vocab.n_users, dtype=pl.UInt32, eager=True)})
    items = pl.DataFrame({S.ITEM_ID: vocab.items,
                          S.ITEM_IDX: pl.int_range(1, vocab.n_items + 1, dtype=pl.UInt32, eager=True)})
    lf = (scan_events(store, days).join(users.lazy(), on=S.USER_ID, how="left", maintain_order="left")
          .join(items.lazy(), on=S.ITEM_ID, how="left", maintain_order="left"))
    with atomic_dir(out, inputs=[store], force=force) as stage:
        work = stage / ".work"
        work.mkdir()
        ranges = [None] if n_rows <= cfg.in_memory_rows else _index_ranges(lf, vocab.n_users, cfg.partition_rows)
        parts, dup_across = [], 0
        for k, bounds in enumerate(ranges):  # repeats share their user: each is found within its range
            part = lf if bounds is None else lf.filter(pl.col(S.USER_IDX).is_between(*bounds))
            df = part.collect(engine="streaming")  # in window (day, file, row) order
            if cfg.dedupe and has_time and df.height:
                first = first_occurrences(df)
                dup_across += df.height - int(first.sum())
                df = df.filter(first)
            df = df.sort([S.USER_IDX, S.TIMESTAMP], nulls_last=False, maintain_order=True)
            if bounds is None:
                parts.append(df.lazy())
            else:
                df.write_parquet(work / f"part-{k:05d}.parquet", compression=PARQUET_COMPRESSION)
                parts.append(pl.scan_parquet(work / f"part-{k:05d}.parquet"))
            del df
        events = pl.concat(parts)
        kcore = {"min_user_events": cfg.min_user_events, "min_item_events": cfg.min_item_events,
                 "rows_removed": 0, "iterations": 0}
        quarantine = [pl.scan_parquet(quarantine_path(store, d)) for d in days]
        if cfg.min_user_events > 1 or cfg.min_item_events > 1:
            keys = events.select(S.USER_IDX, S.ITEM_IDX, POS).collect(engine="streaming")
            keep, reason, iterations = _kcore(keys, cfg)
            kcore.update(rows_removed=int((~keep).sum()), iterations=iterations)
            if not keep.all():
                gone = keys.select(POS).filter(pl.Series(~keep)).with_columns(
                    pl.Series(S.REASON, reason[~keep], dtype=pl.String))
                dropped = events.join(gone.lazy(), on=POS, how="inner").collect(engine="streaming")
                events = events.join(gone.lazy(), on=POS, how="anti", maintain_order="left")
                quarantine.append(_kcore_quarantine(dropped, days, states).lazy())
        events.select(*S.CANONICAL_COLUMNS, S.USER_IDX, S.ITEM_IDX).sink_parquet(
            stage / "events.parquet", engine="streaming", compression=PARQUET_COMPRESSION)
        del parts, events
        vocab.save(stage / "vocab.json")
        pl.concat(quarantine, how="diagonal_relaxed").sink_parquet(stage / "quarantine.parquet", engine="streaming")
        shutil.rmtree(work)
        inputs = [f for d in days for f in states[d]["inputs"]]
        report = _report(stage, cfg, per_file, rows_read, dup_within + dup_across, kcore, vocab, has_time, inputs)
        report.update(partitions=days, rows_duplicate_across_partitions=dup_across, user_ranges=len(ranges),
                      seconds=round(time.perf_counter() - t0, 3),
                      user_ids=states[days[0]]["report"].get("user_ids", "raw"))
        marker = read_marker(store)
        if forgotten or marker:
            report["rows_forgotten"] = forgotten
        if marker:  # the flow reads it here: no warm start from weights trained before the forget
            report["forgotten"] = {k: v for k, v in marker.items() if k != "version"}
            write_json(stage / FORGOTTEN, marker)
        if report["rows_read"] != (report["rows_accepted"] + report["rows_quarantined"] + report["rows_duplicate"]
                                   + report.get("rows_forgotten", 0)):
            raise AssertionError(f"row accounting broken: {report}")
        write_json(stage / "report.json", report)
        (stage / "report.md").write_text(report_markdown(report) + forgotten_markdown(report))
    return report


def _kcore_quarantine(dropped: pl.DataFrame, days: list[str], states: dict[str, dict]) -> pl.DataFrame:
    """k-core's rows for the quarantine: their file and row (as their partition holds them), the reason,
    and their fields as text."""
    files = pl.DataFrame({
        KEY: [Date.fromisoformat(d) for d in days for _ in states[d]["inputs"]],
        _FILE: pl.Series([i for d in days for i in range(len(states[d]["inputs"]))], dtype=pl.UInt16),
        S.SOURCE_FILE: [f for d in days for f in states[d]["inputs"]],
    }).with_columns(pl.col(KEY).cast(dropped[KEY].dtype))
    return dropped.join(files, on=[KEY, _FILE], how="left").select(
        S.SOURCE_FILE, S.SOURCE_ROW, S.REASON,
        pl.col(S.REASON).replace_strict(S.REASON_FIELD, default=None, return_dtype=pl.String).alias("field"),
        *[pl.col(c).cast(pl.String) for c in S.CANONICAL_COLUMNS])


def window_key(store: str | Path, days: list[str], cfg: IngestConfig) -> str:
    """An identity of a window's combined output: its days' hashes and the cross-partition settings."""
    states = read_states(store)
    h = hashlib.sha256(json.dumps([[d, states[d]["hash"]] for d in days]).encode())
    h.update(json.dumps(asdict(cfg), sort_keys=True, default=str).encode())
    marker = read_marker(store)
    if marker:  # a forget rewrote days: a new window
        h.update(f"forgotten {marker['generation']}".encode())
    return h.hexdigest()


# ---- helpers for generated logs ---------------------------------------------------------------------------
def split_by_day(log: str | Path, out_dir: str | Path, timestamp: str = S.TIMESTAMP) -> list[str]:
    """Split a CSV log with epoch-second timestamps into `out_dir/date=YYYY-MM-DD/events.csv`, one file a
    day (rows in log order), as a daily export would deliver it. Returns the files, days in order."""
    df = pl.read_csv(log, infer_schema_length=0)
    day = pl.from_epoch(pl.col(timestamp).cast(pl.Int64), "s").dt.date().cast(pl.String).alias("_day")
    df = df.with_columns(day)
    out = []
    for (d,), part in df.partition_by("_day", as_dict=True, maintain_order=True).items():
        path = Path(out_dir) / f"{KEY}={d}" / "events.csv"
        with atomic_path(path) as tmp:
            part.drop("_day").write_csv(tmp)
        out.append(str(path))
    return sorted(out)
