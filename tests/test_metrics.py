import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from recsys_pretrain.metrics import (
    KS,
    RankingEvaluator,
    binary_metrics,
    evaluate_scores,
    exclusions,
    popularity_scores,
)


def _csr(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    """History CSR (n_users, n_items + 1) with a 1 at each listed item index."""
    r = [u for u, items in enumerate(rows) for _ in items]
    c = [i for items in rows for i in items]
    return sp.csr_matrix((np.ones(len(c), np.float32), (r, c)), shape=(len(rows), n_items + 1))


# ---------------------------------------------------------------- hand-computed ranking metrics


def test_hand_computed_three_users_five_items():
    scores = torch.tensor(
        [
            [0.9, 0.8, 0.7, 0.6, 0.5],  # order 1,2,3,4,5; target 1 -> rank 1
            [0.1, 0.5, 0.4, 0.3, 0.2],  # order 2,3,4,5,1; target 4 -> rank 3
            [0.5, 0.4, 0.3, 0.2, 0.1],  # order 1,2,3,4,5; target 5 -> rank 5 (beyond both K)
        ]
    )
    ev = RankingEvaluator(n_items=5, ks=(1, 3))
    ev.update(scores, torch.tensor([1, 4, 5]))
    m = ev.compute()
    assert m["users"] == 3
    # K=1: only user 0 hits.
    assert m["hr_at_1"] == pytest.approx(1 / 3)
    assert m["ndcg_at_1"] == pytest.approx(1 / 3)
    assert m["mrr_at_1"] == pytest.approx(1 / 3)
    # K=3: hits at ranks 1 and 3; ndcg = (1 + 1/log2(4) + 0) / 3 = 1.5 / 3; mrr = (1 + 1/3 + 0) / 3.
    assert m["hr_at_3"] == pytest.approx(2 / 3)
    assert m["ndcg_at_3"] == pytest.approx(0.5)
    assert m["mrr_at_3"] == pytest.approx(4 / 9)
    # top-1 lists {1}, {2}, {1} -> 2 of 5 items; top-3 lists {1,2,3}, {2,3,4}, {1,2,3} -> 4 of 5.
    assert m["coverage_at_1"] == pytest.approx(2 / 5)
    assert m["coverage_at_3"] == pytest.approx(4 / 5)


def test_rank_two_gain_and_default_keys():
    ev = RankingEvaluator(n_items=30)  # default KS = (10, 20)
    scores = torch.linspace(1.0, 0.0, 30)[None, :]  # item 1 best, item 2 second
    ev.update(scores, torch.tensor([2]))
    m = ev.compute()
    assert set(m) == {f"{name}_at_{k}" for k in KS for name in ("hr", "ndcg", "mrr", "coverage")} | {"users"}
    assert m["ndcg_at_10"] == pytest.approx(1 / math.log2(3))
    assert m["mrr_at_20"] == pytest.approx(0.5)
    assert m["coverage_at_10"] == pytest.approx(10 / 30)
    assert m["coverage_at_20"] == pytest.approx(20 / 30)


def test_empty_evaluator_is_nan_not_zero():
    m = RankingEvaluator(n_items=5, ks=(2,)).compute()
    assert m["users"] == 0
    assert math.isnan(m["hr_at_2"]) and math.isnan(m["ndcg_at_2"])
    assert m["coverage_at_2"] == 0.0


# ---------------------------------------------------------------- exclusion


def test_exclusion_lets_the_target_move_up():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])  # target 3 is at rank 3
    plain = RankingEvaluator(5, ks=(1, 3))
    plain.update(scores, torch.tensor([3]))
    assert plain.compute()["hr_at_1"] == 0.0
    assert plain.compute()["mrr_at_3"] == pytest.approx(1 / 3)

    masked = RankingEvaluator(5, ks=(1, 3))
    masked.update(scores, torch.tensor([3]), exclude=[np.array([1, 2])])
    m = masked.compute()
    assert m["hr_at_1"] == 1.0 and m["ndcg_at_1"] == 1.0
    # the excluded items 1, 2 left the top-3 list: it is {3, 4, 5}
    assert m["coverage_at_3"] == pytest.approx(3 / 5)
    assert scores[0, 0] == pytest.approx(0.9)  # the caller's tensor is not modified


def test_target_inside_its_own_history_is_still_rankable():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])
    ev = RankingEvaluator(5, ks=(1, 3))
    ev.update(scores, torch.tensor([3]), exclude=[np.array([0, 1, 3])])  # 0 = padding, ignored
    m = ev.compute()
    # item 1 removed, item 3 (the target) kept -> order 2, 3, ... -> rank 2
    assert m["hr_at_1"] == 0.0
    assert m["hr_at_3"] == 1.0
    assert m["ndcg_at_3"] == pytest.approx(1 / math.log2(3))


def test_excluded_items_never_fill_a_short_list():
    ev = RankingEvaluator(5, ks=(3,))
    ev.update(torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]]), torch.tensor([5]), exclude=[np.array([1, 2, 3, 4])])
    m = ev.compute()
    assert m["mrr_at_3"] == 1.0  # the only item left is the target
    assert m["coverage_at_3"] == pytest.approx(1 / 5)  # the four -inf items are not "recommended"


def test_target_scored_minus_inf_is_never_a_hit():
    ev = RankingEvaluator(3, ks=(3,))
    ev.update(torch.tensor([[float("-inf"), 0.2, 0.1]]), torch.tensor([1]))  # K covers the whole catalogue
    m = ev.compute()
    assert m["hr_at_3"] == 0.0
    assert m["coverage_at_3"] == pytest.approx(2 / 3)


def test_exclusions_reads_history_rows():
    hist = _csr([[1, 4], [], [2, 3, 5]], n_items=5)
    ex = exclusions(hist, np.array([2, 0, 1]))
    assert [sorted(e.tolist()) for e in ex] == [[2, 3, 5], [1, 4], []]


def test_invalid_inputs_are_rejected():
    ev = RankingEvaluator(5, ks=(2,))
    with pytest.raises(ValueError, match="shape"):
        ev.update(torch.zeros(2, 4), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="1..5"):
        ev.update(torch.zeros(2, 5), torch.tensor([0, 2]))  # padding is not a target
    with pytest.raises(ValueError, match="NaN"):
        ev.update(torch.tensor([[0.1, float("nan"), 0.0, 0.0, 0.0]]), torch.tensor([1]))
    assert ev.users == 0


# ---------------------------------------------------------------- evaluate_scores


def _random_case(seed: int, n_users: int, n_items: int):
    rng = np.random.default_rng(seed)
    table = torch.from_numpy(rng.standard_normal((n_users, n_items)).astype(np.float32))  # no ties
    hist = [rng.choice(np.arange(1, n_items + 1), size=rng.integers(0, n_items // 2), replace=False).tolist()
            for _ in range(n_users)]
    targets = rng.integers(1, n_items + 1, size=n_users)
    for u in range(0, n_users, 5):  # some targets repeat a history item (re-consumption)
        if hist[u]:
            targets[u] = hist[u][0]
    targets[rng.random(n_users) < 0.15] = -1  # users without a held-out item
    return table, _csr(hist, n_items), targets


def test_batching_invariance():
    table, hist, targets = _random_case(0, n_users=53, n_items=40)
    users = np.arange(53)
    runs = [
        evaluate_scores(lambda u: table[u], users, targets, hist, 40, batch_size=bs, ks=(5, 10))
        for bs in (1, 7, 1000)
    ]
    assert runs[0]["users"] == int((targets >= 0).sum())  # missing targets skipped
    assert runs[0] == runs[1] == runs[2]  # exact: rank counts are integers


def _reference(table: np.ndarray, hist: sp.csr_matrix, users, targets, ks):
    """Slow obvious version: per row mask, stable argsort, find the target."""
    n_items = table.shape[1]
    out = {k: [0.0, 0.0, 0.0] for k in ks}
    seen = {k: set() for k in ks}
    n = 0
    for u, t in zip(users, targets, strict=True):
        if t < 0:
            continue
        n += 1
        s = table[u].astype(np.float64).copy()
        for item in hist[u].indices:
            if item != t:
                s[item - 1] = -np.inf
        order = np.argsort(-s, kind="stable") + 1  # item indices, best first
        order = order[np.isfinite(s[order - 1])]
        r = int(np.flatnonzero(order == t)[0]) + 1
        for k in ks:
            seen[k].update(order[:k].tolist())
            if r <= k:
                out[k][0] += 1
                out[k][1] += 1 / math.log2(r + 1)
                out[k][2] += 1 / r
    ref = {}
    for k in ks:
        ref[f"hr_at_{k}"], ref[f"ndcg_at_{k}"], ref[f"mrr_at_{k}"] = (v / n for v in out[k])
        ref[f"coverage_at_{k}"] = len(seen[k]) / n_items
    ref["users"] = n
    return ref


@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_argsort_reference(seed):
    n_users, n_items = [(30, 12), (64, 50), (20, 3), (41, 25), (8, 100), (50, 7)][seed]
    ks = (1, 5, 10)  # K > n_items for some cases
    table, hist, targets = _random_case(seed + 100, n_users, n_items)
    users = np.random.default_rng(seed).permutation(n_users)  # order of users must not matter
    targets = targets[users]
    got = evaluate_scores(lambda u: table[u], users, targets, hist, n_items, batch_size=9, ks=ks)
    ref = _reference(table.numpy(), hist, users, targets, ks)
    assert got["users"] == ref["users"]
    assert got == pytest.approx(ref, rel=1e-12)


def test_nan_targets_are_skipped():
    table, hist, targets = _random_case(3, n_users=10, n_items=6)
    t = targets.astype(np.float64)
    t[targets < 0] = np.nan  # a null from Polars arrives as NaN
    a = evaluate_scores(lambda u: table[u], np.arange(10), t, hist, 6, ks=(3,))
    b = evaluate_scores(lambda u: table[u], np.arange(10), targets, hist, 6, ks=(3,))
    assert a == b and a["users"] == int((targets >= 0).sum())


# ---------------------------------------------------------------- popularity


def test_popularity_counts_users_not_weights():
    # user 0: item 2 twice (weights add to 5), item 4 once; user 1: item 2, plus an explicit zero on item 3;
    # user 2: item 1.
    m = sp.csr_matrix(
        (np.array([2.0, 3.0, 1.0, 0.5, 0.0, 1.0]), np.array([2, 2, 4, 2, 3, 1]), np.array([0, 3, 5, 6])),
        shape=(3, 6),
    )
    assert not m.has_canonical_format and m.nnz == 6  # duplicates and the explicit zero are stored
    pop = popularity_scores(m)
    assert pop.shape == (5,)
    assert pop.tolist() == [1.0, 2.0, 0.0, 1.0, 0.0]  # items 1..5


def test_popularity_baseline_through_evaluate_scores():
    # Item 3 is the most popular; user 0 has seen it, so their top-1 must be the next item, 1.
    train = _csr([[3, 1], [3], [3, 2]], n_items=4)
    pop = popularity_scores(train)  # [1, 1, 3, 0]
    m = evaluate_scores(lambda u: pop.expand(len(u), -1), np.arange(3), np.array([2, 3, 1]), train, 4, ks=(1,))
    # user 0: excluded 1, 3 -> best is item 2 = target: hit. user 1: target 3 is in history, kept: hit.
    # user 2: excluded 2 (3 is excluded too) -> best is item 1 = target: hit.
    assert m["hr_at_1"] == 1.0
    assert m["coverage_at_1"] == pytest.approx(3 / 4)


# ---------------------------------------------------------------- binary metrics


def test_binary_metrics_agree_with_sklearn():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 500)
    p = np.clip(0.3 * y + 0.7 * rng.random(500), 0, 1)
    p[:3] = [0.0, 1.0, 0.0]  # exact 0/1 must not give infinite log loss
    m = binary_metrics(y, p)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["logloss"] == pytest.approx(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)))
    assert math.isfinite(m["logloss"])
    assert m["positive_rate"] == pytest.approx(y.mean())
    assert m["n"] == 500
    assert "gauc" not in m


def test_gauc_hand_made_groups():
    y = np.array([1, 0, 0, 1, 0, 1, 0, 1, 1])
    s = np.array([0.9, 0.5, 0.1, 0.2, 0.6, 0.8, 0.4, 0.3, 0.7])
    g = np.array(["a", "a", "a", "b", "b", "b", "b", "c", "c"])
    # a (3 rows): the positive beats both negatives -> AUC 1.
    # b (4 rows): positives 0.2, 0.8 vs negatives 0.6, 0.4 -> 2 of 4 pairs won -> AUC 0.5.
    # c (2 rows): positives only -> skipped.  GAUC = (3 * 1 + 4 * 0.5) / 7.
    m = binary_metrics(y, s, groups=g)
    assert m["gauc"] == pytest.approx(5 / 7)
    assert m["auc"] == pytest.approx(roc_auc_score(y, s))


def test_single_class_gives_nan():
    m = binary_metrics(np.ones(4), np.array([0.2, 0.4, 0.6, 0.8]), groups=np.array([0, 0, 1, 1]))
    assert math.isnan(m["auc"]) and math.isnan(m["gauc"])
    assert math.isfinite(m["logloss"]) and m["positive_rate"] == 1.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 1), st.integers(0, 5)), min_size=1, max_size=40))
def test_gauc_matches_per_group_sklearn(rows):
    g, y, s = (np.array(c) for c in zip(*rows, strict=True))
    s = s / 5.0  # few distinct scores: plenty of ties
    num = den = 0.0
    for grp in np.unique(g):
        sel = g == grp
        if 0 < y[sel].sum() < sel.sum():
            num += roc_auc_score(y[sel], s[sel]) * sel.sum()
            den += sel.sum()
    got = binary_metrics(y, s, groups=g)["gauc"]
    if den == 0:
        assert math.isnan(got)
    else:
        assert got == pytest.approx(num / den, rel=1e-12)
