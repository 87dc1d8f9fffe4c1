"""The FAISS candidate index: round trip, metadata checks, recall against exact search, tracking."""

import json

import faiss
import numpy as np
import pytest
import torch

from recsys_pretrain.checkpoint import load_model_dir
from recsys_pretrain.config import IndexConfig, load_config
from recsys_pretrain.index import (
    IndexMismatchError,
    build_index,
    build_model_index,
    exact_topk,
    load_index,
    recall_at,
    resolve_factory,
)
from recsys_pretrain.registry import resolve_model_dir
from recsys_pretrain.tracking import NullTracker
from recsys_pretrain.train.pretrain import pretrain
from recsys_pretrain.vocab import Vocab

# Recall is measured on held-out queries, not the ones the knob was tuned on: allow this much below target.
RECALL_TOLERANCE = 0.03


def _train(prepared, out, *extra):
    cfg = load_config(None, ["pretrain.model=mf", "pretrain.mf.dim=16", "pretrain.mf.train.epochs=4",
                             "pretrain.mf.train.progress=false", *extra]).pretrain
    return pretrain(prepared, cfg, out)


@pytest.fixture(scope="module")
def mf_dir(tiny_prepared, tmp_path_factory):
    return _train(tiny_prepared["prepared"], tmp_path_factory.mktemp("mf")).model_dir


def clustered(n, d, n_clusters, seed=0):
    """Item and user vectors with the structure of trained embeddings: clusters of uneven size, a
    popularity skew in the norms, a bias coordinate last (users carry a 1 there)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d - 1))
    sizes = rng.zipf(1.5, n_clusters).astype(float)
    cluster = rng.choice(n_clusters, n, p=sizes / sizes.sum())
    items = centres[cluster] + 0.6 * rng.standard_normal((n, d - 1))
    items *= rng.lognormal(0, 0.3, (n, 1))
    bias = np.log(rng.zipf(1.3, n).clip(max=1e4))[:, None] * 0.3
    users = centres[rng.choice(n_clusters, 600, p=sizes / sizes.sum())] + 0.8 * rng.standard_normal((600, d - 1))
    return (np.hstack([items, bias]).astype(np.float32),
            np.hstack([users, np.ones((600, 1))]).astype(np.float32))


def _vocab(n):
    import polars as pl

    return Vocab.from_ids(pl.Series([0], dtype=pl.Int64), pl.Series(np.arange(1000, 1000 + n), dtype=pl.Int64))


def test_round_trip_metadata_and_tracking(mf_dir, tmp_path):
    tracker = NullTracker()
    res = build_model_index(mf_dir, tmp_path / "idx", IndexConfig(factory="HNSW16", tune_queries=100,
                                                                  tune_latency_queries=20), tracker=tracker)
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    model_meta = json.loads((mf_dir / "model.json").read_text())
    assert meta["resolved_factory"] == "HNSW16" and meta["metric"] == "inner_product"
    assert meta["n_items"] == model_meta["n_items"] and meta["dim"] == 16 + 1  # the bias coordinate
    assert meta["model"]["run_id"] == model_meta["run_id"] and meta["run_id"] == res.run_id
    assert meta["build"]["ef_construction"] == IndexConfig().ef_construction and meta["build"]["seconds"] > 0
    assert meta["search"]["param"] == "efSearch" and meta["search"]["value"] >= 16
    assert meta["recall"]["recall_at_10"] >= 0.95 and meta["recall"]["queries"] == 100
    assert len(meta["index_sha256"]) == 64 and len(meta["embeddings_sha256"]) == 64
    # tracked: the recall / latency curve by efSearch, the final recall, build time and memory
    assert tracker.metrics["recall/recall_at_10"][0][1] == meta["recall"]["recall_at_10"]
    assert {"build/seconds", "build/rss_delta_mib", "index/bytes", "recall/recall_at_100"} <= set(tracker.metrics)
    assert [s for s, _ in tracker.metrics["tune/recall_at_10"]] == [r["efSearch"] for r in meta["tuning"]]

    loaded = load_index(tmp_path / "idx")
    assert faiss.downcast_index(loaded.index.index).hnsw.efSearch == meta["search"]["value"]
    q = np.load(mf_dir / "user_embeddings.npy")[:20]
    labels, scores = loaded.search(q, 10)
    assert labels.min() >= 1 and labels.max() <= meta["n_items"]
    items = np.load(mf_dir / "item_embeddings.npy")
    np.testing.assert_allclose(scores, np.einsum("bkd,bd->bk", items[labels - 1], q), rtol=1e-5, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    assert loaded.vocab.item_ids(labels[0]) == Vocab.load(mf_dir).item_ids(labels[0])


def test_flat_equals_the_models_own_top_k(mf_dir):
    model, meta, vocab = load_model_dir(mf_dir)
    index = build_index(np.load(mf_dir / "item_embeddings.npy"), vocab, IndexConfig(factory="auto"))
    assert index.meta["resolved_factory"] == "Flat"
    users = torch.arange(vocab.n_users)
    with torch.no_grad():
        scores = model.score_users(users)
    top = torch.topk(scores, 10)
    got, got_scores = index.search(np.load(mf_dir / "user_embeddings.npy"), 10)
    # the same top-10 scores; ids may differ only where scores tie (items with no training events score 0)
    np.testing.assert_allclose(got_scores, top.values.numpy(), rtol=1e-5, atol=1e-6)
    want = top.indices.numpy() + 1  # (n_users, 10) item indices
    kth = top.values[:, -1:].numpy()
    untied = np.abs(scores.numpy()[np.arange(len(users))[:, None], want - 1] - kth) > 1e-6
    assert all(set(w[u]) <= set(g) for w, g, u in zip(want, got, untied, strict=True))


@pytest.mark.parametrize("factory,mips", [("HNSW16", "l2"), ("IVF32,Flat", "ip"), ("IVF32,Flat", "l2")])
def test_tuned_recall_reaches_target_on_held_out_queries(factory, mips):
    items, users = clustered(4000, 16, 60)
    tune_q, test_q = users[:300], users[300:]
    cfg = IndexConfig(factory=factory, mips=mips, target_recall=0.95, ef_construction=64, tune_latency_queries=10)
    index = build_index(items, _vocab(len(items)), cfg, queries=tune_q)
    assert index.meta["recall"]["target_met"], index.meta["tuning"]
    truth = exact_topk(items, test_q, 100)
    labels, scores = index.search(test_q, 100)
    assert recall_at(labels, truth, 10) >= 0.95 - RECALL_TOLERANCE
    assert recall_at(labels, truth, 100) >= 0.95 - RECALL_TOLERANCE
    # whatever the index stores (L2 after the reduction), the answers are exact inner products
    np.testing.assert_allclose(scores[:, 0], np.einsum("bd,bd->b", items[labels[:, 0] - 1], test_q), rtol=1e-5)
    # the curve is cheap-to-expensive and stops at the first setting that reaches the target at 10 and 100
    curve = index.meta["tuning"]
    assert all(min(r["recall_at_10"], r["recall_at_100"]) < 0.95 for r in curve[:-1])


def test_hnsw_on_raw_inner_products_falls_short_and_says_so():
    """Why `mips="l2"` is the default: on the same data HNSW over raw inner products stays far below the
    target at 100 even with efSearch 512, where the L2 reduction got there by efSearch 128 or less."""
    items, users = clustered(4000, 16, 60)
    cfg = IndexConfig(factory="HNSW16", mips="ip", ef_construction=64, search_param=512, tune_latency_queries=5)
    index = build_index(items, _vocab(len(items)), cfg, queries=users[:200])
    assert not index.meta["recall"]["target_met"]
    assert index.meta["recall"]["recall_at_100"] < 0.8


def test_load_refuses_mismatches(mf_dir, tmp_path):
    cfg = IndexConfig(factory="Flat", tune_queries=50, tune_latency_queries=5)
    build_model_index(mf_dir, tmp_path / "a", cfg)
    # used with a different model (its item vectors hash differently)
    with pytest.raises(IndexMismatchError, match="embeddings_sha256"):
        load_index(tmp_path / "a", expect={"embeddings_sha256": "0" * 64})
    # metadata edited by hand
    meta_path = tmp_path / "a" / "index.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "n_items": meta["n_items"] + 1}))
    with pytest.raises(IndexMismatchError, match="n_items"):
        load_index(tmp_path / "a")
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(IndexMismatchError, match="format_version"):
        load_index(tmp_path / "a")
    # the index file replaced by another one
    meta_path.write_text(json.dumps(meta))
    faiss.write_index(faiss.IndexFlatIP(meta["dim"]), str(tmp_path / "a" / "index.faiss"))
    with pytest.raises(IndexMismatchError, match="index_sha256"):
        load_index(tmp_path / "a")
    # the vectors replaced
    build_model_index(mf_dir, tmp_path / "b", cfg)
    vec = np.load(tmp_path / "b" / "item_embeddings.npy")
    np.save(tmp_path / "b" / "item_embeddings.npy", vec * 2)
    with pytest.raises(IndexMismatchError, match="embeddings_sha256"):
        load_index(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="not an index directory"):
        load_index(tmp_path)


def test_config_errors_name_the_field():
    items, _ = clustered(200, 8, 5)
    with pytest.raises(ValueError, match="index.factory"):
        build_index(items, _vocab(200), IndexConfig(factory="NoSuchIndex"))
    with pytest.raises(ValueError, match="index.mips"):
        build_index(items, _vocab(200), IndexConfig(factory="HNSW8", mips="cosine"))
    with pytest.raises(ValueError, match="IDMap"):
        build_index(items, _vocab(200), IndexConfig(factory="IDMap,Flat"))
    assert resolve_factory(IndexConfig(auto_flat_max_items=100), 100) == "Flat"
    assert resolve_factory(IndexConfig(auto_flat_max_items=100), 101) == "IVF32,Flat"  # 4 sqrt(101) ~ 2^5
    assert resolve_factory(IndexConfig(factory="IVF{nlist},Flat"), 1_000_000) == "IVF4096,Flat"


def test_model_sources_by_run_id_and_alias(mf_dir, tmp_path, mlflow_uri):
    from recsys_pretrain.registry import register_model, set_alias
    from recsys_pretrain.tracking import MLflowTracker

    tracker = MLflowTracker(mlflow_uri)
    # the model directory, logged as a real run's artifact (as pretraining does) and registered under an alias
    with tracker.start_run("serving-test", "mf") as run_id:
        tracker.log_model_dir(mf_dir, name="model_dir")
    version = register_model(f"runs:/{run_id}/model_dir", "tiny-mf", mlflow_uri)
    set_alias("tiny-mf", "champion", version, mlflow_uri)

    by_run = resolve_model_dir(run_id, mlflow_uri, cache_dir=tmp_path / "cache")
    by_alias = resolve_model_dir("models:/tiny-mf@champion", mlflow_uri, cache_dir=tmp_path / "cache")
    for d in (by_run, by_alias):
        assert np.array_equal(np.load(d / "item_embeddings.npy"), np.load(mf_dir / "item_embeddings.npy"))
    with pytest.raises(FileNotFoundError, match="alias"):
        resolve_model_dir("models:/tiny-mf@nope", mlflow_uri)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        resolve_model_dir(tmp_path / "nowhere", mlflow_uri)

    # an index build on the real store: its recall, build time and memory are in the run
    out = build_model_index(f"runs:/{run_id}", tmp_path / "idx", IndexConfig(factory="HNSW16", tune_queries=50,
                                                                            tune_latency_queries=5),
                            tracker=tracker, tracking_uri=mlflow_uri, cache_dir=tmp_path / "cache")
    from recsys_pretrain.tracking import run_metrics

    metrics = run_metrics(out.run_id, mlflow_uri)
    assert metrics["recall/recall_at_10"] == out.meta["recall"]["recall_at_10"]
    assert metrics["build/seconds"] > 0 and metrics["index/bytes"] > 0


def test_cli_index(mf_dir, tmp_path, capsys):
    from recsys_pretrain.cli import main

    rc = main(["index", str(mf_dir), "--out", str(tmp_path / "idx"), "--factory", "HNSW16", "--no-tracking",
               "tune_queries=50", "tune_latency_queries=5"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["factory"] == "HNSW16" and out["recall"]["queries"] == 50
    assert load_index(tmp_path / "idx").meta["search"]["param"] == "efSearch"
