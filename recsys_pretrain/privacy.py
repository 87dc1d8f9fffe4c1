"""Pseudonymous user ids: a keyed hash (HMAC-SHA256) in place of every raw user id.

    key = load_key(env="RECSYS_USER_KEY", file=None)   # bytes; never printed, logged or stored
    pseudonymise(pl.Series(["alice-7731"]), key)       # -> 32 hex characters, the same for the same key

Ingestion replaces the user id with its token before anything is written (events, quarantine, vocab),
so models, MLflow and the index only ever hold tokens. Quarantined text that may hold other rows' ids
(every field of a malformed row or of one with extra fields, and any value spanning lines: an open quote
swallowed the rows after it) is replaced by tokens of that text (`pseudonymise_raw_text`). `recommend`
hashes a caller's raw ids with the same key before the lookup. The key lives in an environment variable or a file named by config
(`ingest.pseudonymise_key_env` / `ingest.pseudonymise_key_file`); only those names are recorded.

The hash is of an id's canonical text: an integer id as its decimal digits (`42`, never `0042`), a text
id as its text without surrounding blanks. Without the key a token cannot be linked to its raw id
(bar guessing ids and the key together); with it, anyone can. Rotating the key changes every token, so
a new key needs a full re-ingest and retrain.
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

ALGORITHM = "hmac-sha256"
TOKEN_HEX = 32  # 128 bits of the digest: collisions need ~2^64 distinct users
MIN_KEY_BYTES = 16
REPORT_NOTE = f"pseudonymised ({ALGORITHM})"  # report.json "user_ids" when ingested with a key
_INT = re.compile(r"^[+-]?\d+$")
_TOKEN = re.compile(rf"^[0-9a-f]{{{TOKEN_HEX}}}$")
_TOKEN_COL = "_pseudonym"


class PrivacyError(ValueError):
    """The pseudonymisation key is configured but unusable, or does not fit the data."""


def load_key(env: str | None = None, file: str | Path | None = None) -> bytes | None:
    """The key from environment variable `env` or file `file` (one of them; trailing newlines are not part
    of it); None when neither is configured. Errors name the variable or file, never the key."""
    if env and file:
        raise PrivacyError("pseudonymisation key: set either the environment variable or the file, not both")
    if env:
        value = os.environ.get(env)
        if value is None:
            raise PrivacyError(f"pseudonymisation key: environment variable {env} is not set")
        key = value.strip().encode("utf-8")
        where = f"environment variable {env}"
    elif file:
        path = Path(file)
        if not path.is_file():
            raise PrivacyError(f"pseudonymisation key: key file {path} does not exist")
        key = path.read_bytes().strip()
        where = f"key file {path}"
    else:
        return None
    if not key:
        raise PrivacyError(f"pseudonymisation key: {where} is empty")
    if len(key) < MIN_KEY_BYTES:
        raise PrivacyError(f"pseudonymisation key: {where} holds {len(key)} bytes, fewer than {MIN_KEY_BYTES}; "
                           "use a long random secret (e.g. `openssl rand -hex 32`)")
    return key


def key_from_config(cfg: Any) -> bytes | None:
    """The key an IngestConfig points at (its `pseudonymise_key_env` / `pseudonymise_key_file`), or None."""
    return load_key(getattr(cfg, "pseudonymise_key_env", None), getattr(cfg, "pseudonymise_key_file", None))


def token(raw: str, key: bytes) -> str:
    """The token of one id's canonical text."""
    return hmac.digest(key, raw.encode("utf-8"), "sha256").hex()[:TOKEN_HEX]


def canonical_id(x: Any, id_type: str = "str") -> str | None:
    """A raw id (as a caller or a file gives it) as the text that is hashed; None when it is no id.
    `id_type="int"`: decimal text is read as the integer ingestion made of it (`" 0042"` -> `"42"`)."""
    if x is None or isinstance(x, bool):
        return None
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if not isinstance(x, str):
        return None
    s = x.strip()
    if not s:
        return None
    if id_type == "int" and _INT.match(s) and -(2**63) <= int(s) < 2**63:
        return str(int(s))
    return s


def canonical_id_expr(expr: pl.Expr, id_type: str = "str") -> pl.Expr:
    """`canonical_id` over a column of raw text (or integers), as ingestion reads ids."""
    t = expr.cast(pl.String).str.strip_chars()
    t = pl.when(t.str.len_bytes() > 0).then(t)
    if id_type == "int":
        t = pl.coalesce(t.str.to_integer(strict=False).cast(pl.String), t)
    return t


def pseudonymise_ids(ids: Sequence, key: bytes, id_type: str = "str") -> list[str | None]:
    """Tokens of a few raw ids (a request's, a forget list's); None where an entry is no id."""
    return [None if (c := canonical_id(x, id_type)) is None else token(c, key) for x in ids]


def _tokens(values: pl.Series, key: bytes) -> pl.Series:
    """Tokens of distinct, non-null canonical texts: the one place that loops in Python."""
    return pl.Series(_TOKEN_COL, [token(v, key) for v in values.to_list()], dtype=pl.String)


def pseudonymise(ids: pl.Series | pl.Expr, key: bytes) -> pl.Series | pl.Expr:
    """Tokens of a column of ids (integers, or text taken as it is: canonicalise first if it is raw);
    null stays null. Each distinct id is hashed once, then mapped back to the rows by a join."""
    if isinstance(ids, pl.Expr):
        return ids.map_batches(lambda s: pseudonymise(s, key), return_dtype=pl.String)
    text = ids.cast(pl.String)
    uniq = text.drop_nulls().unique()
    table = pl.DataFrame({"_raw": uniq, _TOKEN_COL: _tokens(uniq, key)})
    out = pl.DataFrame({"_raw": text}).join(table, on="_raw", how="left", maintain_order="left")
    return out[_TOKEN_COL].rename(ids.name)


def pseudonymise_frame(lf: pl.LazyFrame, column: str, key: bytes, spill: Path | None = None) -> pl.LazyFrame:
    """`lf` with `column` (ids) replaced by tokens, rows in the same order. The distinct ids are collected
    and hashed once; the result is materialised in memory, or, when `spill` is given, streamed to that
    Parquet file (large inputs) so later passes read tokens instead of hashing again."""
    uniq = lf.select(pl.col(column).unique()).collect(engine="streaming").to_series().drop_nulls()
    table = pl.DataFrame({column: uniq, _TOKEN_COL: _tokens(uniq.cast(pl.String), key)})
    out = (lf.join(table.lazy(), on=column, how="left", maintain_order="left")
           .with_columns(pl.col(_TOKEN_COL).alias(column)).drop(_TOKEN_COL))
    if spill is None:
        return out.collect(engine="streaming").lazy()
    out.sink_parquet(spill, engine="streaming")
    return pl.scan_parquet(spill)


def pseudonymise_columns(lf: pl.LazyFrame, columns: Sequence[str], key: bytes, id_type: str) -> pl.LazyFrame:
    """Raw id columns (text as read: the quarantine's) replaced by the tokens of their canonical ids;
    values that are no id (blank) become null. Columns `lf` lacks are skipped."""
    names = set(lf.collect_schema().names())
    return lf.with_columns([pseudonymise(canonical_id_expr(pl.col(c), id_type), key).alias(c)
                            for c in columns if c in names])


# Quarantine reasons whose row's fields may hold other rows' text: an open quote swallows the lines after it,
# a row with extra fields puts values (ids among them) in the wrong columns.
BROKEN_ROW_REASONS = ("malformed_row", "extra_fields")


def pseudonymise_raw_text(lf: pl.LazyFrame, columns: Sequence[str], key: bytes, broken: pl.Expr,
                          id_type: str = "str") -> pl.LazyFrame:
    """Quarantined raw text that may hold user ids of other rows replaced by tokens of its canonical text
    (`canonical_id`): every value of `columns` in the rows where `broken` holds (see BROKEN_ROW_REASONS),
    and, in any row, a value that spans lines (a quote left open swallowed the lines after it, ids and all).
    Other values stay as read. Null stays null; columns `lf` lacks are skipped."""
    names = set(lf.collect_schema().names())
    out = []
    for c in columns:
        if c not in names:
            continue
        raw = pl.col(c).cast(pl.String)
        hide = (broken | raw.str.contains(r"[\r\n]")).fill_null(False)
        hashed = pseudonymise(canonical_id_expr(pl.when(hide).then(raw), id_type), key)
        out.append(pl.when(hide).then(hashed).otherwise(raw).alias(c))
    return lf.with_columns(out) if out else lf


def looks_pseudonymised(users: pl.Series) -> bool:
    """Whether a vocabulary's user ids are all tokens (a hint for callers that forgot the key)."""
    if users.dtype != pl.String or users.is_empty():
        return False
    return bool(users.head(100).str.contains(_TOKEN.pattern).all())
