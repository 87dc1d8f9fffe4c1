"""Evaluation metrics: full-catalogue ranking (leave-last-out) and binary click/purchase labels.

Ranking is never sampled: every row is scored against all n_items items, seen items are removed
(set to -inf) and the held-out target is located in the top-K list with torch.topk, batch by batch,
so no (n_users, n_items) matrix is ever built. Item indices follow the vocabulary: real items are
1..n_items and column j of a score matrix is item j + 1.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.metrics import log_loss, roc_auc_score

KS = (10, 20)
PROB_EPS = 1e-7  # float32 probabilities saturate at 1 - 6e-8, so clip to something float32 can hold


class RankingEvaluator:
    """Accumulate full-ranking metrics over batches: HR@K, NDCG@K, MRR@K and catalogue coverage@K."""

    def __init__(self, n_items: int, ks: tuple[int, ...] = KS):
        if n_items < 1:
            raise ValueError(f"n_items must be >= 1, got {n_items}")
        if not ks or any(int(k) < 1 for k in ks):
            raise ValueError(f"ks must be positive integers, got {ks}")
        self.n_items = int(n_items)
        self.ks = tuple(sorted({int(k) for k in ks}))
        self.k_max = min(self.ks[-1], self.n_items)  # topk cannot ask for more than the catalogue
        # Counts of targets found at rank r (index r, 1..k_max): integers make the result exact and
        # independent of how the users were batched; the float64 metrics are derived in compute().
        self.rank_counts = torch.zeros(self.k_max + 1, dtype=torch.int64)
        # Best (smallest 0-based) position at which each item appeared in any top-k_max list; an item
        # is covered at K iff its best position < K, so one vector serves every K.
        self.best_pos = torch.full((self.n_items,), self.k_max, dtype=torch.int64)
        self.users = 0

    def update(self, scores: torch.Tensor, targets: torch.Tensor, exclude: list[np.ndarray] | None = None) -> None:
        """scores (B, n_items) float; targets (B,) item indices in 1..n_items; exclude: per row the item
        indices already seen (set to -inf before ranking). The target itself is never excluded, even if it
        appears in the history (re-consumption datasets), so a repeat can still be a hit.

        Indices outside 1..n_items in `exclude` (padding 0, the mask token) are ignored. An item scored
        -inf is not ranked: it counts neither as a hit nor towards coverage.
        """
        if scores.ndim != 2 or scores.shape[1] != self.n_items:
            raise ValueError(f"scores must have shape (B, {self.n_items}), got {tuple(scores.shape)}")
        targets = torch.as_tensor(targets)
        if targets.is_floating_point() or targets.is_complex():
            raise TypeError(f"targets must be integer item indices, got dtype {targets.dtype}")
        b = scores.shape[0]
        if targets.shape != (b,):
            raise ValueError(f"targets must have shape ({b},), got {tuple(targets.shape)}")
        if exclude is not None and len(exclude) != b:
            raise ValueError(f"exclude must hold one array per row ({b}), got {len(exclude)}")
        if b == 0:
            return
        t = targets.detach().cpu().numpy().astype(np.int64)  # (B,)
        if t.min() < 1 or t.max() > self.n_items:
            raise ValueError(f"targets must be item indices in 1..{self.n_items}, got {t.min()}..{t.max()}")
        scores = scores.detach()
        if torch.isnan(scores).any():
            raise ValueError("scores contain NaN")

        rows, cols = _exclusion_pairs(exclude, t, self.n_items) if exclude is not None else (None, None)
        if not scores.is_floating_point():
            scores = scores.float()  # a copy, so masking below leaves the caller's tensor alone
        elif rows is not None and len(rows):
            scores = scores.clone(memory_format=torch.contiguous_format)
        if rows is not None and len(rows):
            r = torch.from_numpy(rows).to(scores.device)
            c = torch.from_numpy(cols - 1).to(scores.device)  # item index -> column
            scores[r, c] = float("-inf")  # (B, n_items)

        top_val, top_idx = torch.topk(scores, self.k_max, dim=1)  # (B, k_max), descending
        ranked = top_val > float("-inf")  # (B, k_max) excluded / -inf entries are not in the list
        tgt = torch.from_numpy(t - 1).to(scores.device)  # (B,) column of the target
        hit = (top_idx == tgt[:, None]) & ranked  # (B, k_max), at most one True per row
        found = hit.any(dim=1)  # (B,)
        rank = hit.to(torch.int8).argmax(dim=1) + 1  # (B,) 1-based; meaningless where not found
        self.rank_counts += torch.bincount(rank[found].cpu(), minlength=self.k_max + 1)

        pos = torch.arange(self.k_max, device=scores.device).expand(b, -1)  # (B, k_max)
        self.best_pos.scatter_reduce_(0, top_idx[ranked].cpu(), pos[ranked].cpu(), reduce="amin")
        self.users += b

    def compute(self) -> dict[str, float]:
        """{"hr_at_10", "ndcg_at_10", "mrr_at_10", "coverage_at_10", ..., "users": n} averaged over rows.

        With no rows seen, HR/NDCG/MRR are NaN and coverage is 0.
        """
        counts = self.rank_counts.to(torch.float64)  # (k_max + 1,), index = rank
        r = torch.arange(self.k_max + 1, dtype=torch.float64)
        gain = torch.where(r > 0, 1.0 / torch.log2(r + 1), 0.0)  # (k_max + 1,) one relevant item: IDCG = 1
        recip = torch.where(r > 0, 1.0 / r.clamp(min=1), 0.0)
        n = self.users
        out: dict[str, float] = {}
        for k in self.ks:
            kk = min(k, self.k_max)
            if n:
                out[f"hr_at_{k}"] = float(counts[1 : kk + 1].sum() / n)
                out[f"ndcg_at_{k}"] = float((counts[: kk + 1] * gain[: kk + 1]).sum() / n)
                out[f"mrr_at_{k}"] = float((counts[: kk + 1] * recip[: kk + 1]).sum() / n)
            else:
                out[f"hr_at_{k}"] = out[f"ndcg_at_{k}"] = out[f"mrr_at_{k}"] = float("nan")
            out[f"coverage_at_{k}"] = float((self.best_pos < kk).sum()) / self.n_items
        out["users"] = n
        return out


def _exclusion_pairs(exclude: list[np.ndarray], targets: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) pairs to mask: items in 1..n_items, the row's own target left out."""
    lens = np.fromiter((len(e) for e in exclude), dtype=np.int64, count=len(exclude))
    if lens.sum() == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    rows = np.repeat(np.arange(len(exclude), dtype=np.int64), lens)
    cols = np.concatenate([np.asarray(e).ravel() for e in exclude]).astype(np.int64)
    keep = (cols >= 1) & (cols <= n_items) & (cols != targets[rows])
    return rows[keep], cols[keep]


def exclusions(history: sp.csr_matrix, users: np.ndarray) -> list[np.ndarray]:
    """Per user of the batch, the item indices in their history row.

    Every stored entry counts as seen (whatever its weight); duplicates are harmless for masking.
    """
    if not sp.issparse(history) or history.format != "csr":
        history = sp.csr_matrix(history)
    indptr, indices = history.indptr, history.indices
    return [indices[indptr[u] : indptr[u + 1]] for u in np.asarray(users, dtype=np.int64)]


def evaluate_scores(
    score_fn: Callable[[np.ndarray], torch.Tensor],
    users: np.ndarray,
    targets: np.ndarray,
    history: sp.csr_matrix | None,
    n_items: int,
    batch_size: int = 1024,
    ks: tuple[int, ...] = KS,
) -> dict[str, float]:
    """Run score_fn(users_batch: np.ndarray) -> torch.Tensor (b, n_items) over all users in batches and
    return the metrics. Rows whose target is missing (negative, or NaN from a null) are skipped.

    history None means nothing is excluded.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    users = np.asarray(users)
    targets = np.asarray(targets)
    if users.shape != targets.shape or users.ndim != 1:
        raise ValueError(f"users and targets must be 1-D of equal length, got {users.shape} and {targets.shape}")
    present = targets >= 0
    if targets.dtype.kind == "f":
        present &= ~np.isnan(targets)
    users = users[present].astype(np.int64)  # (n,)
    targets = targets[present].astype(np.int64)  # (n,)

    ev = RankingEvaluator(n_items, ks)
    with torch.no_grad():  # score_fn usually runs a model; no graph is needed to rank
        for lo in range(0, len(users), batch_size):
            ub = users[lo : lo + batch_size]
            scores = score_fn(ub)  # (b, n_items)
            ex = exclusions(history, ub) if history is not None else None
            ev.update(scores, torch.from_numpy(targets[lo : lo + batch_size]), ex)
    return ev.compute()


def popularity_scores(train: sp.csr_matrix) -> torch.Tensor:
    """(n_items,) interaction counts per item (column 1..n_items of the matrix, counting users, not weights)."""
    m = sp.csr_matrix(train, copy=True)
    m.sum_duplicates()  # a user's repeated entries are one user
    m.eliminate_zeros()  # an explicit zero is no interaction
    counts = np.bincount(m.indices, minlength=m.shape[1])  # (n_items + 1,)
    return torch.from_numpy(counts[1:].astype(np.float32))  # (n_items,) column 0 is padding


def binary_metrics(y_true: np.ndarray, y_score: np.ndarray, groups: np.ndarray | None = None) -> dict[str, float]:
    """{"auc", "logloss", "gauc" (if groups given), "positive_rate", "n"} with sklearn.metrics.roc_auc_score and
    log_loss (probabilities clipped); GAUC = per-group AUC averaged with weights = group size, over groups that
    have both classes (the standard definition from the DIN paper); NaN where undefined (one class only)."""
    y = np.asarray(y_true).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true and y_score differ in length: {y.shape} vs {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must hold binary labels 0/1")
    if not np.isfinite(s).all():
        raise ValueError("y_score must be finite")
    y = y.astype(np.int64)
    n = len(y)
    nan = float("nan")
    both = n > 0 and 0 < y.sum() < n
    out: dict[str, float] = {
        "auc": float(roc_auc_score(y, s)) if both else nan,
        "logloss": float(log_loss(y, np.clip(s, PROB_EPS, 1 - PROB_EPS), labels=[0, 1])) if n else nan,
    }
    if groups is not None:
        g = np.asarray(groups).ravel()
        if g.shape != y.shape:
            raise ValueError(f"groups and y_true differ in length: {g.shape} vs {y.shape}")
        out["gauc"] = _gauc(y, s, g) if n else nan
    out["positive_rate"] = float(y.mean()) if n else nan
    out["n"] = n
    return out


def _gauc(y: np.ndarray, s: np.ndarray, g: np.ndarray) -> float:
    """Size-weighted mean of per-group AUC over groups with both classes, vectorised over groups.

    Per group AUC = (sum of positives' mid-ranks - P(P+1)/2) / (P N), the Mann-Whitney form, which equals
    roc_auc_score (a tied pair counts 1/2); one sklearn call per group would be slow for 1e5+ users.
    """
    _, gid = np.unique(g, return_inverse=True)
    order = np.lexsort((s, gid))  # by group, then score ascending
    gs, ss, ys = gid[order], s[order], y[order]
    n = len(ys)
    # A block = a run of equal (group, score); its rows share the mean of their ranks within the group.
    new_block = np.r_[True, (gs[1:] != gs[:-1]) | (ss[1:] != ss[:-1])]
    block = np.cumsum(new_block) - 1  # (n,)
    new_group = np.r_[True, gs[1:] != gs[:-1]]
    group_start = np.flatnonzero(new_group)[np.cumsum(new_group) - 1]  # (n,) first position of own group
    rank_in_group = np.arange(n) - group_start + 1.0  # (n,) 1-based
    block_sum = np.bincount(block, weights=rank_in_group)
    block_len = np.bincount(block)
    midrank = (block_sum / block_len)[block]  # (n,)

    n_groups = gs[-1] + 1
    size = np.bincount(gs, minlength=n_groups).astype(np.float64)
    pos = np.bincount(gs, weights=ys, minlength=n_groups)
    neg = size - pos
    pos_rank_sum = np.bincount(gs, weights=midrank * ys, minlength=n_groups)
    ok = (pos > 0) & (neg > 0)
    if not ok.any():
        return float("nan")
    auc = (pos_rank_sum[ok] - pos[ok] * (pos[ok] + 1) / 2) / (pos[ok] * neg[ok])
    return float(np.sum(auc * size[ok]) / np.sum(size[ok]))
