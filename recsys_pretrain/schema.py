"""The event-log schema: the one place that names columns, their types and the event types."""

from __future__ import annotations

import polars as pl

USER_ID = "user_id"
ITEM_ID = "item_id"
TIMESTAMP = "timestamp"
EVENT_TYPE = "event_type"
SESSION_ID = "session_id"
CATEGORY_ID = "category_id"
VALUE = "value"

REQUIRED_COLUMNS = (USER_ID, ITEM_ID, TIMESTAMP, EVENT_TYPE)
OPTIONAL_COLUMNS = (SESSION_ID, CATEGORY_ID, VALUE)
CANONICAL_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS

# Dense indices added by ingestion (see vocab.py); items start at 1 because 0 is padding.
USER_IDX = "user_idx"
ITEM_IDX = "item_idx"

# Provenance kept on every row so that any output row can be traced back to its input line.
SOURCE_FILE = "source_file"
SOURCE_ROW = "source_row"  # 1-based data row in its file (the header, if any, is not counted)
REASON = "reason"

EVENT_TYPES = ("impression", "click", "add_to_cart", "favorite", "purchase", "rating")
EVENT_DTYPE = pl.Enum(list(EVENT_TYPES))
TIMESTAMP_DTYPE = pl.Datetime("us", "UTC")

# Source vocabularies mapped onto the canonical event types. Sources add to this through config.
DEFAULT_EVENT_ALIASES: dict[str, str] = {
    **{t: t for t in EVENT_TYPES},
    "pv": "click",
    "view": "click",
    "buy": "purchase",
    "transaction": "purchase",
    "cart": "add_to_cart",
    "addtocart": "add_to_cart",
    "fav": "favorite",
}

# Reasons a row is quarantined, in the order they are checked (a row gets the first that applies).
REASONS = (
    "malformed_row",  # the row's structure: unbalanced quote, not JSON, a `::` separator out of place
    "extra_fields",  # more non-empty fields than the file has columns
    "empty_row",
    "missing_user_id",
    "missing_item_id",
    "bad_user_id",
    "bad_item_id",
    "missing_timestamp",
    "bad_timestamp",
    "timestamp_out_of_range",
    "missing_event_type",
    "unknown_event_type",
    "bad_value",
    "below_min_user_events",
    "below_min_item_events",
)

# The field each reason is about, written beside the reason in the quarantine.
REASON_FIELD = {
    "empty_row": None,
    "malformed_row": None,
    "extra_fields": None,
    "missing_user_id": USER_ID,
    "bad_user_id": USER_ID,
    "missing_item_id": ITEM_ID,
    "bad_item_id": ITEM_ID,
    "missing_timestamp": TIMESTAMP,
    "bad_timestamp": TIMESTAMP,
    "timestamp_out_of_range": TIMESTAMP,
    "missing_event_type": EVENT_TYPE,
    "unknown_event_type": EVENT_TYPE,
    "bad_value": VALUE,
    "below_min_user_events": USER_ID,
    "below_min_item_events": ITEM_ID,
}
