"""The user x item matrix for matrix factorisation (users x items, fixed here once and for all)."""

from __future__ import annotations

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys_pretrain import schema as S


def interaction_matrix(events: pl.DataFrame, n_users: int, n_items: int, weights: dict[str, float]) -> sp.csr_matrix:
    """CSR of shape (n_users, n_items + 1): column = item index, so column 0 (padding) is always empty.

    Each event adds the weight of its type; repeats add up. Event types without a weight count 0.
    """
    unknown = set(weights) - set(S.EVENT_TYPES)
    if unknown:
        raise ValueError(f"event_weights: unknown event types {sorted(unknown)}; known: {S.EVENT_TYPES}")
    w = events.select(
        pl.col(S.EVENT_TYPE).cast(pl.String).replace_strict(weights, default=0.0, return_dtype=pl.Float32)
    ).to_series().to_numpy()
    rows = events[S.USER_IDX].to_numpy()
    cols = events[S.ITEM_IDX].to_numpy()
    keep = w != 0
    m = sp.coo_matrix((w[keep], (rows[keep], cols[keep])), shape=(n_users, n_items + 1), dtype=np.float32)
    return m.tocsr()  # duplicates are summed here
