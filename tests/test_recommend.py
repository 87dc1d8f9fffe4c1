"""Recommendations in raw ids: exact agreement with the model, seen-item filtering, fallbacks, filters,
the re-ranking hook, the CLI."""

import json

import numpy as np
import pytest
import torch

from recsys_pretrain.checkpoint import load_model_dir
from recsys_pretrain.config import IndexConfig, load_config
from recsys_pretrain.index import IndexMismatchError, build_model_index
from recsys_pretrain.recommend import Recommender, pyfunc_reranker
from recsys_pretrain.train.pretrain import pretrain


def _train(prepared, out, model="mf", *extra):
    over = {"mf": ["pretrain.mf.dim=16", "pretrain.mf.train.epochs=4", "pretrain.mf.train.progress=false"],
            "bert4rec": ["pretrain.bert4rec.dim=16", "pretrain.bert4rec.n_layers=1", "pretrain.bert4rec.n_heads=1",
                         "pretrain.bert4rec.max_len=20", "pretrain.bert4rec.train.epochs=2",
                         "pretrain.bert4rec.train.progress=false"]}[model]
    return pretrain(prepared, load_config(None, [f"pretrain.model={model}", *over, *extra]).pretrain, out).model_dir


@pytest.fixture(scope="module")
def mf_dir(tiny_prepared, tmp_path_factory):
    return _train(tiny_prepared["prepared"], tmp_path_factory.mktemp("mf"))


@pytest.fixture(scope="module")
def rec(mf_dir):
    return Recommender.load(mf_dir)  # exact index built in memory


def _exact(model, users, history, k):
    """The model's own top-k item indices with the user's history removed: the reference answer."""
    with torch.no_grad():
        s = model.score_users(torch.as_tensor(users)).clone()  # (b, n_items)
    for r, u in enumerate(users):
        seen = history.indices[history.indptr[u] : history.indptr[u + 1]]
        s[r, seen - 1] = -float("inf")
    return torch.topk(s, k).indices.numpy() + 1


def test_known_users_get_the_models_exact_top_k_minus_seen(rec, mf_dir):
    model, _, vocab = load_model_dir(mf_dir)
    users = np.arange(vocab.n_users)
    answers = rec.recommend(vocab.user_ids(users), k=10)
    want = _exact(model, users, rec.histories, 10)
    for a, w in zip(answers, want, strict=True):
        assert a.method == "user_vector" and a.fallback is None and not a.reranked
        assert a.ids == vocab.item_ids(w)
        assert a.scores == sorted(a.scores, reverse=True)


def test_seen_items_are_never_returned(rec):
    vocab = rec.vocab
    n = vocab.n_items
    for u in range(0, vocab.n_users, 7):
        seen = set(vocab.item_ids(rec.histories.indices[rec.histories.indptr[u] : rec.histories.indptr[u + 1]]))
        (a,) = rec.recommend(vocab.user_ids([u]), k=n)  # ask for the whole catalogue
        assert not seen & set(a.ids)
        assert len(a.ids) == n - len(seen) == len(set(a.ids))  # everything else, once each
    (a,) = rec.recommend(vocab.user_ids([0]), k=n, exclude_seen=False)
    assert len(a.ids) == n


def test_unknown_user_gets_popular_items_flagged(rec):
    known = rec.vocab.user_ids([3])[0]
    answers = rec.recommend([known, 10**12, "not-a-number", None], k=5)
    assert answers[0].fallback is None
    top = rec.vocab.item_ids(np.argsort(-rec.popularity, kind="stable")[:5] + 1)
    for a, raw in zip(answers[1:], [10**12, "not-a-number", None], strict=True):
        assert a.fallback == "unknown_user" and a.method == "popularity" and a.unknown == [raw]
        assert a.ids == top
    # raw ids as text reach the same user as ints (a URL path is text)
    assert rec.recommend([str(known)], k=5)[0].ids == answers[0].ids


@pytest.mark.parametrize("k", [0, -1, 1001, 2.5, True, "10"])
def test_k_is_bounded(rec, k):
    with pytest.raises(ValueError, match="k must"):
        rec.recommend([1], k=k)


def test_history_for_mf_is_the_mean_item_vector(rec, mf_dir):
    vocab = rec.vocab
    raw = vocab.item_ids([1, 5, 9])
    (a,) = rec.recommend_for_history([[*raw, "nope"]], k=10)
    assert a.method == "mean_item_vector" and a.fallback is None and a.unknown == ["nope"]
    assert not set(raw) & set(a.ids)
    items = np.load(mf_dir / "item_embeddings.npy")
    q = items[[0, 4, 8]].mean(axis=0)
    q[-1] = 1.0
    scores = items @ q
    scores[[0, 4, 8]] = -np.inf
    assert a.ids == vocab.item_ids(np.argsort(-scores, kind="stable")[:10] + 1)
    (empty, unknown) = rec.recommend_for_history([[], ["x", "y"]], k=3)
    assert empty.fallback == unknown.fallback == "no_known_items" and unknown.unknown == ["x", "y"]
    with pytest.raises(ValueError, match="list of histories"):
        rec.recommend_for_history(raw, k=3)


def test_history_for_bert4rec_is_encoded_by_the_transformer(tiny_prepared, tmp_path):
    model_dir = _train(tiny_prepared["prepared"], tmp_path, "bert4rec")
    rec = Recommender.load(model_dir)
    model, _, vocab = load_model_dir(model_dir)
    hist = np.array([3, 7, 2, 11])
    (a,) = rec.recommend_for_history([vocab.item_ids(hist)], k=10)
    with torch.no_grad():
        logits = model(model.query_inputs([hist]))[0][0].clone()  # (n_items,) the model's next-item scores
    logits[hist - 1] = -float("inf")
    assert a.method == "bert4rec_history"
    assert a.ids == vocab.item_ids(torch.topk(logits, 10).indices.numpy() + 1)
    np.testing.assert_allclose(a.scores, torch.topk(logits, 10).values.numpy(), rtol=1e-4, atol=1e-4)


def test_similar_items(rec, mf_dir):
    items = np.load(mf_dir / "item_embeddings.npy")
    raw = rec.vocab.item_ids([4])[0]
    a, unknown = rec.similar_items([raw, "nope"], k=5)
    s = items[:, :-1] @ items[3, :-1]  # dot products without the bias coordinate
    s[3] = -np.inf  # not itself
    assert a.method == "item_vector" and raw not in a.ids
    assert a.ids == rec.vocab.item_ids(np.argsort(-s, kind="stable")[:5] + 1)
    assert unknown.ids == [] and unknown.fallback == "unknown_item"


def test_category_filter(mf_dir, tiny_prepared):
    import polars as pl

    events = tiny_prepared["ingested"] / "events.parquet"
    rec = Recommender.load(mf_dir, categories=events)
    cat = (pl.read_parquet(events, columns=["item_id", "category_id"]).unique("item_id")
           .with_columns(pl.col("category_id").cast(pl.String)))
    of = dict(zip(cat["item_id"].to_list(), cat["category_id"].to_list(), strict=True))
    c = cat["category_id"][0]
    for a in rec.recommend(rec.vocab.user_ids(np.arange(20)), k=5, category=c):
        assert a.ids and all(of[i] == c for i in a.ids)
    (p,) = rec.recommend([10**12], k=5, category=c)
    assert p.fallback == "unknown_user" and all(of[i] == c for i in p.ids)
    with pytest.raises(ValueError, match="category: unknown"):
        rec.recommend([1], k=5, category="no-such-category")
    rec_plain = Recommender.load(mf_dir)
    with pytest.raises(ValueError, match="category: no item categories"):
        rec_plain.recommend([1], k=5, category=c)


def test_category_filter_through_an_approximate_index(mf_dir, tiny_prepared, tmp_path):
    # over 50k items a category goes through the index, over-fetching until enough items pass the filter
    import recsys_pretrain.recommend as recommend

    build_model_index(mf_dir, tmp_path / "idx", IndexConfig(factory="HNSW16", tune_queries=50,
                                                            tune_latency_queries=5))
    events = tiny_prepared["ingested"] / "events.parquet"
    rec = Recommender.load(mf_dir, tmp_path / "idx", categories=events)
    exact = Recommender.load(mf_dir, categories=events)
    old = recommend.BRUTE_FORCE_MAX_ITEMS
    recommend.BRUTE_FORCE_MAX_ITEMS = 0
    try:
        c = exact.category_names[1]
        users = rec.vocab.user_ids(np.arange(30))
        got = rec.recommend(users, k=5, category=c)
    finally:
        recommend.BRUTE_FORCE_MAX_ITEMS = old
    want = exact.recommend(users, k=5, category=c)
    overlap = np.mean([len(set(g.ids) & set(w.ids)) / 5 for g, w in zip(got, want, strict=True)])
    assert overlap >= 0.9 and [len(g.ids) for g in got] == [len(w.ids) for w in want]


def test_index_of_another_model_is_refused(mf_dir, tiny_prepared, tmp_path):
    other = _train(tiny_prepared["prepared"], tmp_path / "other", "mf", "pretrain.mf.loss=softmax")  # other vectors
    cfg = IndexConfig(factory="Flat", tune_queries=20, tune_latency_queries=2)
    build_model_index(other, tmp_path / "idx", cfg)
    with pytest.raises(IndexMismatchError, match="embeddings_sha256"):
        Recommender.load(mf_dir, tmp_path / "idx")
    assert Recommender.load(other, tmp_path / "idx").index.n_items == Recommender.load(other).index.n_items


def test_reranker_hook(mf_dir):
    plain = Recommender.load(mf_dir)
    assert plain.metadata()["reranker"] is None and "no re-ranker" in plain.metadata()["reranker_note"]
    calls = []

    def reverse(users, candidates):  # prefers what the model ranks lowest: an easy order to check
        calls.append((users, [len(c) for c in candidates]))
        return [np.arange(len(c), dtype=float) for c in candidates]

    rec = Recommender.load(mf_dir, reranker=reverse, reranker_name="reverse", rerank_pool=30)
    user = plain.vocab.user_ids([0])[0]
    (base,) = plain.recommend([user], k=30)
    (a,) = rec.recommend([user], k=5)
    assert a.reranked and a.ids == base.ids[::-1][:5]
    assert calls == [([user], [30])]
    (h,) = rec.recommend_for_history([plain.vocab.item_ids([1, 2])], k=3)
    assert calls[-1][0] == [None]  # an anonymous history has no user id for the ranker


def test_pyfunc_reranker_adapter():
    import pandas as pd

    class Ranker:  # the contract of tracking.RankerScorer: (user_id, item_id) pairs -> a table of columns
        def predict(self, df):
            return pd.DataFrame({"p_ctcvr": [float(i) for i in df["item_id"]]})

    rerank = pyfunc_reranker(Ranker())
    out = rerank(["u", None], [[3, 1, 2], [5, 6]])
    assert out[0].tolist() == [3.0, 1.0, 2.0] and np.isnan(out[1]).all()


def test_cli_recommend(mf_dir, tiny_prepared, capsys):
    from recsys_pretrain.cli import main

    rec = Recommender.load(mf_dir)
    user = str(rec.vocab.user_ids([2])[0])
    assert main(["recommend", "--model", str(mf_dir), "--user", user, "--user", "999999", "-k", "3",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["user"] for o in out] == [user, "999999"]
    assert [i["item_id"] for i in out[0]["items"]] == rec.recommend([user], k=3)[0].ids
    assert out[1]["fallback"] == "unknown_user"
    items = ",".join(map(str, rec.vocab.item_ids([1, 2, 3])))
    assert main(["recommend", "--model", str(mf_dir), "--history", items, "-k", "2"]) == 0
    table = capsys.readouterr().out
    assert "mean_item_vector" in table and "rank" in table
    assert main(["recommend", "--model", str(mf_dir), "--similar", items.split(",")[0], "-k", "2"]) == 0
    assert "item_vector" in capsys.readouterr().out
    assert main(["recommend", "--model", str(mf_dir), "--user", user, "-k", "0"]) == 2
    assert "k must be between 1 and 1000" in capsys.readouterr().err


def test_answer_invariants_property(rec):
    """Any user, any k: at most k items, no seen item, no repeats, best first, as many as the catalogue
    minus the seen items allows."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    n_users, n_items = rec.vocab.n_users, rec.vocab.n_items

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(users=st.lists(st.integers(0, n_users - 1), min_size=1, max_size=4), k=st.integers(1, n_items + 5))
    def check(users, k):
        for u, a in zip(users, rec.recommend(rec.vocab.user_ids(users), k=k), strict=True):
            seen = set(rec.vocab.item_ids(rec._seen(u)))
            assert len(a.ids) == min(k, n_items - len(seen)) == len(set(a.ids))
            assert not seen & set(a.ids)
            assert a.scores == sorted(a.scores, reverse=True)

    check()


@pytest.mark.parametrize("ids,query,want", [
    ([3, 10, 42], [10, "42", " 3", "x", 4, True, None, 2**70, np.int64(3)], [2, 3, 1, -1, -1, -1, -1, -1, 1]),
    (["a", "b", "é"], ["b", "é", 1, None, "c"], [2, 3, -1, -1, -1]),
    (["1", "2"], [1, "2"], [1, 2]),  # text ids: an int is looked up as its text
])
def test_id_map_is_tolerant_and_agrees_with_the_vocab(ids, query, want):
    import polars as pl

    from recsys_pretrain.recommend import _IdMap
    from recsys_pretrain.vocab import Vocab

    vocab = Vocab.from_ids(pl.Series(["u"]), pl.Series(ids))
    m = _IdMap(vocab.items, 1)
    assert m.index(query).tolist() == want
    found = [w for w in want if w > 0]
    assert m.raw(np.array(found)) == vocab.item_ids(np.array(found))
    assert vocab.item_index(pl.Series(vocab.item_ids(np.array(found)))).tolist() == found  # agrees with the vocab
