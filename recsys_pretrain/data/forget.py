"""Forget users: remove every row of theirs from an ingested directory, and leave a marker that tells the
nightly flow to retrain from scratch (a warm start would carry what the old weights learnt from them).

    forget("data/default/ingested/ab12...", ["alice-7731"], key=load_key(env="RECSYS_USER_KEY"))

What changes, all at once (the directory is published as a new version, like ingest's outputs):
- events.parquet: the users' events are gone; users (and items left without events) are re-indexed so
  that `user_idx` / `item_idx` stay the positions in vocab.json, as a fresh ingest would make them.
- quarantine.parquet: rows whose user column holds one of the users are gone (pseudonymised data: also
  malformed rows and rows with extra fields holding one of their tokens in another column).
- vocab.json: without those users (and without items no event mentions any more).
- report.json / report.md: counts recomputed; `rows_forgotten` keeps the accounting whole,
  rows_read == rows_accepted + rows_quarantined + rows_duplicate + rows_forgotten
  (rows_duplicate still counts repeats the users had: those were never stored), and a `forgotten` section.
- FORGOTTEN.json: the marker (see `MARKER`); it holds counts and times, never an id.

K-core thresholds are not applied again: an item or user that the removal leaves below
`min_item_events` / `min_user_events` stays until the next ingest.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl

from recsys_pretrain import privacy
from recsys_pretrain import schema as S
from recsys_pretrain.config import IngestConfig, from_dict

# _report: the ingest report's statistics, recomputed on the smaller data (one definition of them)
from recsys_pretrain.data.formats import FORMATS
from recsys_pretrain.data.ingest import PARQUET_COMPRESSION, _report, report_markdown, resolve_spec
from recsys_pretrain.io import atomic_dir, file_lock, write_json, write_text
from recsys_pretrain.vocab import Vocab

# The marker, in the ingested directory:
# {"version": 1, "generation": <forgets that removed rows, 1, 2, ...>, "last_forget_at": "<ISO time, UTC>",
#  "users": <users forgotten, all forgets>, "events_removed": n, "quarantine_removed": n, "items_dropped": n,
#  "history": [{"at", "users", "events_removed", "quarantine_removed", "items_dropped"}, ...]}
MARKER = "FORGOTTEN.json"
_REWRITTEN = {"events.parquet", "quarantine.parquet", "vocab.json", "report.json", "report.md", MARKER}


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _quarantine_user_columns(cfg: IngestConfig) -> list[str]:
    """Names the user column may have in the quarantine (the raw columns of the sources, as read)."""
    names = {resolve_spec(cfg).columns.get(S.USER_ID)}
    if cfg.format == "movielens":  # its csv variant names the column userId
        names |= {"userId", FORMATS["movielens"].columns[S.USER_ID]}
    return sorted(n for n in names if n)


def _stored_ids(user_ids: list, key: bytes | None, id_type: str) -> list:
    """Each requested user as the data stores it: a token, or the canonical raw id (None: no id at all)."""
    stored = [privacy.canonical_id(x, id_type) for x in user_ids]
    if key is not None:
        stored = [None if t is None else privacy.token(t, key) for t in stored]
    return stored


def _typed(stored: list, dtype: pl.DataType) -> list:
    """`stored` as values of a user-id column of `dtype`: text that is no integer cannot be an integer id."""
    if dtype == pl.String:
        return list(stored)
    return [int(v) if v is not None and v.lstrip("+-").isdigit() else None for v in stored]


def _quarantine_hits(q: pl.LazyFrame, cfg: IngestConfig, stored: list, key: bytes | None) -> tuple[pl.Expr, set]:
    """The rows of quarantine `q` that hold one of the `stored` users in their user column (pseudonymised
    data: also broken rows holding one of the tokens in another column), as a filter expression; and which
    of the users were found there."""
    q_cols = [c for c in _quarantine_user_columns(cfg) if c in q.collect_schema().names()]
    wanted = sorted({s for s in stored if s is not None})
    if not (q_cols and wanted):
        return pl.lit(False), set()
    id_type = resolve_spec(cfg).id_type
    q_user = [pl.col(c) if key else privacy.canonical_id_expr(pl.col(c), id_type) for c in q_cols]
    if key is not None:
        # a broken row's other fields hold tokens too (ingest hashed them): one may be the user's own id,
        # shifted into another column by extra fields
        schema = q.collect_schema()
        others = [c for c, t in schema.items() if t == pl.String and c not in q_cols
                  and c not in (S.SOURCE_FILE, S.REASON, "field")]
        broken = pl.col(S.REASON).is_in(list(privacy.BROKEN_ROW_REASONS))
        q_user += [pl.when(broken).then(pl.col(c)) for c in others]
    in_q = pl.any_horizontal([u.is_in(wanted) for u in q_user]).fill_null(False)
    hits = q.filter(in_q).select(pl.concat_list(q_user).alias("u")).collect()["u"].explode()
    return in_q, set(hits.drop_nulls().to_list())


def _check_key(where: Path, user_ids_note: str, key: bytes | None) -> None:
    pseudonymised = user_ids_note != "raw"
    if pseudonymised and key is None:
        raise privacy.PrivacyError(f"{where}: user ids are pseudonymised ({user_ids_note}); give the key it was "
                                   "ingested with (--key-env / --key-file) to forget raw ids")
    if not pseudonymised and key is not None:
        raise privacy.PrivacyError(f"{where}: user ids are not pseudonymised; forget them without a key")


def forget(ingested_dir: str | Path, user_ids: Sequence, key: bytes | None = None) -> dict:
    """Remove `user_ids` (raw ids; hashed with `key` when the directory was ingested with one) from
    `ingested_dir`. Returns counts, never ids: `users_found`, `events_removed`, `quarantine_removed`,
    `items_dropped`, and `not_found`, the positions in `user_ids` of users the directory holds nothing of.
    When none is found nothing is written (`changed` False)."""
    d = Path(ingested_dir)
    for name in ("events.parquet", "quarantine.parquet", "vocab.json", "report.json"):
        if not (d / name).exists():
            raise FileNotFoundError(f"{d / name}: not found; forget works on an ingested directory")
    if isinstance(user_ids, (str, bytes, int)):
        raise ValueError("user_ids must be a list of ids")
    user_ids = list(user_ids)
    if not user_ids:
        raise ValueError("forget: no user ids given")
    # One forget at a time per directory: two read-modify-writes at once would lose one's removals.
    with file_lock(d.parent / f".{d.name}.forget.lock"):
        return _forget_locked(d, user_ids, key)


def _forget_locked(d: Path, user_ids: list, key: bytes | None) -> dict:
    report = json.loads((d / "report.json").read_text())
    _check_key(d, report.get("user_ids", "raw"), key)
    cfg = from_dict(IngestConfig, report["config"])
    vocab = Vocab.load(d / "vocab.json")
    stored = _stored_ids(user_ids, key, resolve_spec(cfg).id_type)

    # Events: each user's index in the vocabulary (-1: none).
    vals = _typed(stored, vocab.users.dtype)
    ok = [i for i, v in enumerate(vals) if v is not None]
    pos = np.full(len(stored), -1, dtype=np.int64)
    if ok:
        pos[ok] = vocab.user_index(pl.Series([vals[i] for i in ok], dtype=vocab.users.dtype), strict=False)
    removed_users = sorted({int(p) for p in pos if p >= 0})

    # Quarantine: rows whose user column holds one of them (as tokens when pseudonymised).
    q = pl.scan_parquet(d / "quarantine.parquet")
    in_q, in_quarantine = _quarantine_hits(q, cfg, stored, key)

    hit = [s is not None and (p >= 0 or s in in_quarantine) for s, p in zip(stored, pos, strict=True)]
    found = len({s for s, h in zip(stored, hit, strict=True) if h})
    result = {"dir": str(d), "users_requested": len(user_ids), "users_found": found,
              "not_found": [i for i, h in enumerate(hit) if not h],
              "events_removed": 0, "quarantine_removed": 0, "items_dropped": 0, "changed": False}
    if not found:
        return result

    events = pl.scan_parquet(d / "events.parquet")
    gone = pl.Series(removed_users, dtype=pl.UInt32)
    kept = events.filter(~pl.col(S.USER_IDX).is_in(gone.implode()))
    present = kept.select(pl.col(S.ITEM_IDX).unique()).collect()[S.ITEM_IDX]
    dropped_items = pl.Series(sorted(set(range(1, vocab.n_items + 1)) - set(present.to_list())), dtype=pl.UInt32)
    n_events = events.select(pl.len()).collect().item()
    # Dense indices again: an index drops by the number of removed ones below it (order is kept).
    kept = kept.with_columns(
        (pl.col(S.USER_IDX) - pl.lit(gone).search_sorted(pl.col(S.USER_IDX))).cast(pl.UInt32),
        (pl.col(S.ITEM_IDX) - pl.lit(dropped_items).search_sorted(pl.col(S.ITEM_IDX))).cast(pl.UInt32),
    )
    keep_users = np.ones(vocab.n_users, dtype=bool)
    keep_users[removed_users] = False
    keep_items = np.ones(vocab.n_items, dtype=bool)
    keep_items[dropped_items.to_numpy().astype(np.int64) - 1] = False
    new_vocab = Vocab(users=vocab.users.filter(pl.Series(keep_users)), items=vocab.items.filter(pl.Series(keep_items)))

    with atomic_dir(d, force=True) as stage:  # checked above: an ingested directory
        kept.sink_parquet(stage / "events.parquet", engine="streaming", compression=PARQUET_COMPRESSION)
        n_q = q.select(pl.len()).collect().item()
        q.filter(~in_q).sink_parquet(stage / "quarantine.parquet", engine="streaming")
        new_vocab.save(stage / "vocab.json")
        for entry in d.iterdir():  # anything else the directory holds goes along unchanged
            if entry.name not in _REWRITTEN and entry.name != ".recsys-pretrain":
                (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, stage / entry.name)

        n_left = pl.scan_parquet(stage / "events.parquet").select(pl.len()).collect().item()
        q_left = pl.scan_parquet(stage / "quarantine.parquet").select(pl.len()).collect().item()
        result.update(events_removed=n_events - n_left, quarantine_removed=n_q - q_left,
                      items_dropped=len(dropped_items), changed=True)
        if new_vocab.n_users != vocab.n_users - len(removed_users) or (
                n_left and pl.scan_parquet(stage / "events.parquet").select(pl.col(S.USER_IDX).max()).collect().item()
                >= new_vocab.n_users):
            raise AssertionError("forget: user indices do not match the vocabulary")  # a bug

        marker = _marker(d, result)
        new = _report(stage, cfg, [dict(f) for f in report["files"]], report["rows_read"], report["rows_duplicate"],
                      report["kcore"], new_vocab, report["has_timestamps"], report["inputs"])
        new = {**report, **{k: v for k, v in new.items() if k not in ("dataset", "config")}}
        new["rows_forgotten"] = report.get("rows_forgotten", 0) + result["events_removed"] + result["quarantine_removed"]
        new["forgotten"] = {k: v for k, v in marker.items() if k != "version"}
        if new["rows_read"] != (new["rows_accepted"] + new["rows_quarantined"] + new["rows_duplicate"]
                                + new["rows_forgotten"]):
            raise AssertionError(f"forget: row accounting broken: {new}")  # a bug
        write_json(stage / "report.json", new)
        write_text(stage / "report.md", report_markdown(new) + forgotten_markdown(new))
        write_json(stage / MARKER, marker)
    return result


def _marker(d: Path, result: dict) -> dict:
    old = read_marker(d) or {"version": 1, "generation": 0, "users": 0, "events_removed": 0,
                             "quarantine_removed": 0, "items_dropped": 0, "history": []}
    at = _now()
    step = {"at": at, "users": result["users_found"], "events_removed": result["events_removed"],
            "quarantine_removed": result["quarantine_removed"], "items_dropped": result["items_dropped"]}
    return {"version": 1, "generation": old["generation"] + 1, "last_forget_at": at,
            **{k: old[k] + step[k] for k in ("users", "events_removed", "quarantine_removed", "items_dropped")},
            "history": [*old["history"], step]}


def forgotten_markdown(report: dict) -> str:
    f = report.get("forgotten")
    if not f:
        return ""
    return (f"\n## Forgotten users\n\n{f['users']:,} user(s) forgotten in {f['generation']} request(s), the last at "
            f"{f['last_forget_at']}: {f['events_removed']:,} events and {f['quarantine_removed']:,} quarantined rows "
            f"removed ({report['rows_forgotten']:,} rows in all); {f['items_dropped']:,} item(s) left without events "
            "dropped from the vocabulary.\n")


# ---- for the nightly flow ------------------------------------------------------------------------------------
def read_marker(ingested_dir: str | Path) -> dict | None:
    """The FORGOTTEN.json of an ingested directory, or None when nobody was forgotten from it."""
    p = Path(ingested_dir) / MARKER
    return json.loads(p.read_text()) if p.exists() else None


def last_forget(paths: str | Path | Iterable[str | Path]) -> datetime | None:
    """The time of the latest forget in these ingested directories or partition stores (a directory with
    its own marker); any other directory is searched one level down (`data/<name>/ingested`). None when there
    was none."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    dirs: list[Path] = []
    for p in map(Path, paths):
        own = (p / "events.parquet").exists() or (p / MARKER).exists()
        dirs += [p] if own else [c for c in sorted(p.glob("*")) if c.is_dir()]
    times = [datetime.fromisoformat(m["last_forget_at"]) for m in map(read_marker, dirs) if m]
    return max(times, default=None)


def forget_pending(paths: str | Path | Iterable[str | Path], trained_at: datetime | str | None) -> str | None:
    """Why a model trained at `trained_at` (aware datetime or ISO text; None = unknown) must not be
    warm-started from: users were forgotten from these ingested directories after it was trained.
    None when no forget came later."""
    last = last_forget(paths)
    if last is None:
        return None
    if isinstance(trained_at, str):
        trained_at = datetime.fromisoformat(trained_at)
    if trained_at is not None and trained_at.tzinfo is None:
        trained_at = trained_at.replace(tzinfo=UTC)
    if trained_at is None or last > trained_at:
        return f"from scratch: users were forgotten at {last.isoformat()}, after the champion was trained"
    return None
