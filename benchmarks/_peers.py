"""Peers of benchmarks/suite.py: popularity, EASE and implicit's ALS under the library's evaluation.

Each peer is chosen on validation (fit on each user's training items, rank the validation item) and, with
`refit`, fit again with the chosen settings on training + validation items (`data.histories("test")`) before
ranking the test item; the figure of the validation-only fit on test is kept beside it. Every ranking goes
through `recsys_pretrain.metrics.evaluate_scores`: the whole catalogue, the user's history excluded.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch
from scipy.linalg import lapack

from recsys_pretrain.data.prepared import PreparedData, history_matrix
from recsys_pretrain.evaluation import evaluate_popularity
from recsys_pretrain.metrics import evaluate_scores

EASE_LAMBDAS = (1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 3000.0)
EASE_EXHAUSTIVE_ITEMS = 10_000  # above: a hill climb over the grid from its middle (each fit is O(n^3))
EASE_FLOAT64_ITEMS = 10_000  # above: the inverse in float32 (half the memory, twice the speed)
ALS_GRID = {"factors": (64, 128), "regularization": (0.01, 0.1, 1.0), "alpha": (1.0, 10.0), "iterations": (15,)}


class Split:
    """The binary user x item matrices (n_users, n_items) a peer fits on, and the ranking of one stage."""

    def __init__(self, data: PreparedData):
        self.data = data
        # What evaluation excludes, per stage: (n_users, n_items + 1) with the padding column 0.
        self.history = {s: history_matrix(data.histories(s), data.n_items) for s in ("valid", "test")}
        # Fit matrices: training items only (validation), training + validation items (refit for test).
        self.train = self.history["valid"][:, 1:].tocsr()
        self.train_valid = self.history["test"][:, 1:].tocsr()

    def rank(self, stage: str, score_fn: Callable[[np.ndarray], torch.Tensor]) -> dict[str, float]:
        """score_fn(users (b,)) -> (b, n_items) scores; metrics over every user with a `stage` target."""
        t = self.data.targets(stage)
        users = np.flatnonzero(t >= 0)
        return evaluate_scores(score_fn, users, t[users], self.history[stage], self.data.n_items)


def _clock() -> float:
    return time.perf_counter()


# ---- popularity ---------------------------------------------------------------------------------------------
def run_popularity(split: Split, refit: bool) -> dict:
    """Users per item. Without refit: the library's `evaluate_popularity` (training counts); with refit the
    counts of training + validation items."""
    data = split.data
    t0 = _clock()
    valid = evaluate_popularity(data, "valid")
    test_fit_train = evaluate_popularity(data, "test")
    out = {"valid": valid, "test_no_refit": test_fit_train, "train_seconds": 0.0, "chosen": {}}
    if refit:
        t = _clock()
        counts = torch.from_numpy(np.bincount(split.train_valid.indices, minlength=data.n_items).astype(np.float32))
        out["train_seconds"] = _clock() - t
        out["test"] = split.rank("test", lambda u: counts.expand(len(u), -1))
    else:
        out["test"] = test_fit_train
    out["seconds"] = _clock() - t0
    return out


# ---- EASE -----------------------------------------------------------------------------------------------------
def gram(X: sp.csr_matrix) -> np.ndarray:
    """(n_items, n_items) X^T X of a binary matrix: co-occurrence counts, exact in float32 (below 2^24)."""
    return (X.T @ X).astype(np.float32).toarray()


def ease_weights(G: np.ndarray, lam: float, float64: bool = True) -> np.ndarray:
    """EASE (Steck 2019): B = I - P diag(1/diag(P)), P = (G + lam I)^-1, diagonal of B zero; (n, n) float32.
    The inverse by Cholesky (potrf + potri, about n^3 flops, in place)."""
    n = G.shape[0]
    # A copy (G serves every lambda) in LAPACK's Fortran order: G is symmetric, so G.T is that layout already.
    A = np.array(G.T, dtype=np.float64 if float64 else np.float32, order="F")
    A[np.diag_indices(n)] += lam
    potrf, potri = (lapack.dpotrf, lapack.dpotri) if float64 else (lapack.spotrf, lapack.spotri)
    c, info = potrf(A, lower=1, overwrite_a=1, clean=0)
    if info:
        raise np.linalg.LinAlgError(f"EASE: Cholesky failed (info {info}) at lambda {lam}")
    P, info = potri(c, lower=1, overwrite_c=1)
    if info:
        raise np.linalg.LinAlgError(f"EASE: inverse failed (info {info}) at lambda {lam}")
    _symmetrise_lower(P)
    d = np.diag(P).copy()
    P /= -d[None, :]  # B[:, j] = -P[:, j] / P[j, j]
    np.fill_diagonal(P, 0.0)
    return P.astype(np.float32, copy=False)


def _symmetrise_lower(P: np.ndarray, block: int = 1024) -> None:
    """Copy the lower triangle (what potri writes) onto the upper one, a block of rows at a time (no n^2 index)."""
    n = P.shape[0]
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        P[i0:i1, i1:] = P[i1:, i0:i1].T
        d = P[i0:i1, i0:i1]
        P[i0:i1, i0:i1] = np.tril(d) + np.tril(d, -1).T


def ease_scorer(B: np.ndarray, H: sp.csr_matrix) -> Callable[[np.ndarray], torch.Tensor]:
    """Scores of a batch of users: their binary history rows (sparse) times B: O(history x n) per user."""
    H = H.astype(np.float32)
    return lambda u: torch.from_numpy(np.asarray(H[u] @ B))


def hill_climb(n: int, score: Callable[[int], float], start: int) -> None:
    """Walk the grid index 0..n-1 from `start` to a local maximum of `score` (called at most once per index
    by the caller's memo)."""
    i = start
    while True:
        best = max((j for j in (i - 1, i, i + 1) if 0 <= j < n), key=score)
        if best == i:
            return
        i = best


def run_ease(split: Split, refit: bool, lambdas: tuple[float, ...] = EASE_LAMBDAS, max_items: int = 20_000,
             log: Callable[[str], None] = print) -> dict:
    data = split.data
    n = data.n_items
    if n > max_items:
        return {"skipped": f"skipped: {n:,} items (EASE's dense {n:,} x {n:,} inverse is beyond this machine's "
                           f"memory and time; limit --ease-max-items {max_items:,})"}
    float64 = n <= EASE_FLOAT64_ITEMS
    exhaustive = n <= EASE_EXHAUSTIVE_ITEMS
    t0 = _clock()
    fit_s = 0.0
    t = _clock()
    G = gram(split.train)
    fit_s += _clock() - t
    H_valid, H_test = split.history["valid"][:, 1:].tocsr(), split.history["test"][:, 1:].tocsr()
    tried: dict[int, dict] = {}

    def score(i: int) -> float:
        nonlocal fit_s
        if i not in tried:
            t = _clock()
            B = ease_weights(G, lambdas[i], float64)
            fit_s += _clock() - t
            tried[i] = {"B": B, "valid": split.rank("valid", ease_scorer(B, H_valid))}
            log(f"    EASE lambda {lambdas[i]:g}: valid NDCG@10 {tried[i]['valid']['ndcg_at_10']:.4f}")
            if len(tried) > 1:  # keep only the best B so far in memory (n^2 floats each)
                best = max(tried, key=lambda k: tried[k]["valid"]["ndcg_at_10"] if "B" in tried[k] else -1)
                for k in tried:
                    if k != best:
                        tried[k].pop("B", None)
        return tried[i]["valid"]["ndcg_at_10"]

    if exhaustive:
        for i in range(len(lambdas)):
            score(i)
    else:
        hill_climb(len(lambdas), score, start=len(lambdas) // 2)
    best = max(tried, key=lambda k: tried[k]["valid"]["ndcg_at_10"])
    lam, B = lambdas[best], tried[best]["B"]
    out = {"chosen": {"lambda": lam}, "valid": tried[best]["valid"],
           "grid": [{"lambda": lambdas[k], "valid_ndcg_at_10": v["valid"]["ndcg_at_10"]} for k, v in sorted(tried.items())],
           "search": "every lambda of the grid" if exhaustive else "hill climb over the grid from its middle",
           "precision": "float64" if float64 else "float32"}
    out["test_no_refit"] = split.rank("test", ease_scorer(B, H_test))  # B from training items; input: train + valid
    if refit:
        del B, tried[best]["B"]
        t = _clock()
        G = gram(split.train_valid)
        B = ease_weights(G, lam, float64)
        fit_s += _clock() - t
        out["test"] = split.rank("test", ease_scorer(B, H_test))
    else:
        out["test"] = out["test_no_refit"]
    out["train_seconds"] = fit_s
    out["seconds"] = _clock() - t0
    return out


# ---- implicit ALS ---------------------------------------------------------------------------------------------
def als_fit(X: sp.csr_matrix, params: dict, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(user factors, item factors, fit seconds) of implicit's CPU ALS on the binary matrix X (users x items)."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):  # implicit's advice: its own threads, single-threaded BLAS
        model = AlternatingLeastSquares(**params, random_state=seed)  # checks the BLAS threads here
        t = _clock()
        model.fit(X, show_progress=False)
        secs = _clock() - t
    return np.asarray(model.user_factors), np.asarray(model.item_factors), secs


def factor_scorer(U: np.ndarray, V: np.ndarray) -> Callable[[np.ndarray], torch.Tensor]:
    Ut, Vt = torch.from_numpy(U).float(), torch.from_numpy(V).float()
    return lambda u: Ut[torch.from_numpy(u)] @ Vt.T


def run_als(split: Split, refit: bool, grid: dict = ALS_GRID, seed: int = 0,
            log: Callable[[str], None] = print) -> dict:
    import implicit

    t0 = _clock()
    fit_s, results = 0.0, []
    best = None
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values, strict=True))
        U, V, secs = als_fit(split.train, params, seed)
        fit_s += secs
        valid = split.rank("valid", factor_scorer(U, V))
        results.append({**params, "valid_ndcg_at_10": valid["ndcg_at_10"], "fit_seconds": secs})
        log(f"    ALS {params}: valid NDCG@10 {valid['ndcg_at_10']:.4f} ({secs:.1f}s)")
        if best is None or valid["ndcg_at_10"] > best["valid"]["ndcg_at_10"]:
            best = {"params": params, "valid": valid, "U": U, "V": V}
    out = {"chosen": best["params"], "valid": best["valid"], "grid": results, "version": implicit.__version__,
           "seed": seed}
    out["test_no_refit"] = split.rank("test", factor_scorer(best["U"], best["V"]))  # user factors: train items
    if refit:
        U, V, secs = als_fit(split.train_valid, best["params"], seed)
        fit_s += secs
        out["test"] = split.rank("test", factor_scorer(U, V))
    else:
        out["test"] = out["test_no_refit"]
    out["train_seconds"] = fit_s
    out["seconds"] = _clock() - t0
    return out


__all__ = ["ALS_GRID", "EASE_LAMBDAS", "Split", "ease_weights", "run_als", "run_ease", "run_popularity"]
