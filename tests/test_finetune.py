"""Labels in time, the ESMM ranker and its three initialisations, on tiny data."""

import json

import numpy as np
import polars as pl
import pytest

from recsys_pretrain import schema as S
from recsys_pretrain.config import IngestConfig, LabelConfig, load_config
from recsys_pretrain.data.ingest import ingest
from recsys_pretrain.data.labels import build_labels
from recsys_pretrain.ranker import load_ranker, score_pairs
from recsys_pretrain.registry import load_pyfunc
from recsys_pretrain.tracking import MLflowTracker, NullTracker
from recsys_pretrain.train.finetune import check_pretrained_before_labels, finetune, pretrain_before_cutoff

HEADER = "user_id,item_id,timestamp,event_type,session_id,category_id\n"


def _ingest(write, tmp_path, rows):
    body = "".join(f"{u},{i},{1700000000 + t},{e},s{u},{c}\n" for u, i, t, e, c in rows)
    ingest([write("log.csv", HEADER + body)], tmp_path / "ing", IngestConfig())
    return tmp_path / "ing"


def test_impression_labels_with_known_answers(write, tmp_path):
    rows = [
        ("a", "x", 0, "click", 1), ("b", "y", 10, "click", 1),  # before T1
        ("a", "y", 100, "impression", 1), ("a", "y", 110, "click", 1), ("a", "y", 150, "purchase", 1),  # 1, 1
        ("a", "z", 100, "impression", 2),  # shown, never clicked: 0, 0
        ("b", "x", 200, "impression", 1), ("b", "x", 200 + 7200, "click", 1),  # clicked 2 h later: 0 (1 h window)
        ("b", "z", 300, "impression", 2), ("b", "z", 305, "click", 2),  # clicked, not bought: 1, 0
        ("a", "x", 9000, "impression", 1), ("a", "x", 9001, "click", 1), ("a", "x", 9002, "purchase", 1),
    ]
    ing = _ingest(write, tmp_path, rows)
    cfg = LabelConfig(pretrain_cutoff="2023-11-14T22:14:00+00:00", test_cutoff="2023-11-15T00:00:00+00:00")
    report = build_labels(ing, tmp_path / "labels", cfg)
    lab = pl.read_parquet(tmp_path / "labels" / "labels.parquet").sort(T := "time", S.ITEM_IDX)
    got = [(r["split"], r["y_click"], r["y_purchase"]) for r in lab.iter_rows(named=True)]
    assert got == [("finetune", 1, 1), ("finetune", 0, 0), ("finetune", 0, 0), ("finetune", 1, 0),
                   ("test", 1, 1)]
    assert report["negatives"].startswith("impressions")
    assert report["splits"]["finetune"]["rows"] == 4 and report["splits"]["test"]["rows"] == 1
    # the pretraining events all precede T1, and no label precedes it
    pre = pl.read_parquet(tmp_path / "labels" / "pretrain" / "events.parquet")
    t1 = pl.Series([report["t1"]]).str.to_datetime(time_zone="UTC")[0]
    assert pre.height == 2 and pre[S.TIMESTAMP].max() < t1 <= lab[T].min()


def test_sampled_negatives_without_impressions(write, tmp_path):
    rows = [(u, i, t, "click", 1) for t, (u, i) in enumerate(
        [("a", "p"), ("b", "q"), ("a", "q"), ("c", "p"), ("b", "r"), ("c", "s"), ("a", "s"), ("b", "p")])]
    rows += [("c", "t", 50, "purchase", 1), ("c", "t", 49, "click", 1)]
    ing = _ingest(write, tmp_path, rows)
    report = build_labels(ing, tmp_path / "labels", LabelConfig(pretrain_cutoff=0.3, test_cutoff=0.7,
                                                                 negatives_per_positive=3))
    lab = pl.read_parquet(tmp_path / "labels" / "labels.parquet")
    assert report["negatives"].startswith("sampled")
    neg = lab.filter(pl.col("source") == "sampled")
    assert neg.height > 0 and (neg["y_click"] == 0).all() and (neg["y_purchase"] == 0).all()
    ev = pl.read_parquet(ing / "events.parquet")
    touched = set(zip(ev[S.USER_IDX].to_list(), ev[S.ITEM_IDX].to_list(), strict=True))
    assert not any((u, i) in touched for u, i in zip(neg[S.USER_IDX], neg[S.ITEM_IDX], strict=True))
    bought = lab.filter(pl.col("y_purchase") == 1)
    assert bought.height == 1 and bought["y_click"].item() == 1


@pytest.fixture(scope="module")
def tiny_labels(tiny_prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    build_labels(tiny_prepared["ingested"], root / "labels", LabelConfig())
    cfg = load_config(None, ["pretrain.model=mf", "pretrain.mf.dim=8", "pretrain.mf.train.epochs=4"]).pretrain
    res = pretrain_before_cutoff(root / "labels", cfg, root / "pre")
    return root / "labels", res.model_dir


@pytest.mark.parametrize("init", ["frozen", "finetuned", "random"])
def test_each_initialisation_trains(tiny_labels, tmp_path, init):
    label_dir, model_dir = tiny_labels
    cfg = load_config(None, [f"finetune.init={init}", "finetune.train.epochs=3"]).finetune
    before = np.load(model_dir / "item_embeddings.npy")
    res = finetune(label_dir, model_dir, cfg, tmp_path / "ft", tracker=NullTracker())
    assert 0.0 <= res.test["click_auc"] <= 1.0 and res.fit.epochs_run >= 1
    net, feats, vocab = load_ranker(res.ranker_dir)
    items = net.item.weight.detach().numpy()[1:]
    if init == "frozen":
        np.testing.assert_array_equal(items, before)  # pretrained and untouched
    elif init == "finetuned":
        assert not np.array_equal(items, before) and np.abs(items - before).max() < 0.5
    else:
        assert np.abs(items - before).mean() > 0.01  # not the pretrained vectors


def test_half_the_labels_trains_on_fewer_rows(tiny_labels, tmp_path):
    label_dir, model_dir = tiny_labels
    full = finetune(label_dir, model_dir, load_config(None, ["finetune.train.epochs=1"]).finetune, tmp_path / "a")
    half = finetune(label_dir, model_dir, load_config(None, ["finetune.train.epochs=1",
                                                             "finetune.label_fraction=0.5"]).finetune, tmp_path / "b")
    assert 0.35 * full.train_rows < half.train_rows < 0.65 * full.train_rows


@pytest.mark.parametrize("init", ["frozen", "finetuned", "random"])
def test_ranker_loads_back_from_mlflow_and_scores_pairs(tiny_labels, tmp_path, mlflow_uri, init):
    label_dir, model_dir = tiny_labels
    cfg = load_config(None, ["finetune.train.epochs=2", f"finetune.init={init}"]).finetune
    res = finetune(label_dir, model_dir, cfg, tmp_path / "ft", tracker=MLflowTracker(mlflow_uri))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    run = client.get_run(res.run_id)
    assert "test/click_auc" in run.data.metrics and run.data.tags["init"] == init
    logged = [m for m in client.search_logged_models([run.info.experiment_id]) if m.source_run_id == res.run_id]
    scorer = load_pyfunc(f"models:/{logged[0].model_id}", mlflow_uri)
    net, feats, vocab = load_ranker(res.ranker_dir)
    users, items = np.array([0, 1, 2]), np.array([1, 2, 3])
    import pandas as pd

    got = scorer.predict(pd.DataFrame({"user_id": vocab.user_ids(users), "item_id": vocab.item_ids(items)}))
    want = score_pairs(net, feats, users, items)
    np.testing.assert_allclose(got["p_ctcvr"].to_numpy(), want["ctcvr"], rtol=1e-5)
    assert np.isnan(scorer.predict(pd.DataFrame({"user_id": [10**9], "item_id": [1]}))["p_ctr"]).all()


def test_a_model_pretrained_on_everything_is_refused(tiny_prepared, tmp_path):
    from recsys_pretrain.train.pretrain import pretrain

    cfg = load_config(None, ["pretrain.model=mf", "pretrain.mf.dim=8", "pretrain.mf.train.epochs=1"]).pretrain
    res = pretrain(tiny_prepared["prepared"], cfg, tmp_path / "all")
    with pytest.raises(ValueError, match="label window"):
        check_pretrained_before_labels(res.model_dir)
    assert json.loads((res.model_dir / "model.json").read_text())["dataset"] == "events"
