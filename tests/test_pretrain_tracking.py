"""The pretraining stage end to end on tiny data, tracked in a real MLflow SQLite store."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from recsys_pretrain.checkpoint import load_model_dir
from recsys_pretrain.config import load_config
from recsys_pretrain.data.prepared import load_prepared
from recsys_pretrain.evaluation import evaluate
from recsys_pretrain.registry import load_pyfunc
from recsys_pretrain.tracking import MLflowTracker
from recsys_pretrain.train.pretrain import pretrain

TINY = {
    "mf": ["pretrain.mf.dim=16"],  # the default solver, als: the grid of 6 settings, one evaluation each
    "mf_softmax": ["pretrain.mf.dim=16", "pretrain.mf.loss=softmax", "pretrain.mf.train.epochs=6",
                   "pretrain.mf.train.eval_every=2"],
    "bert4rec": ["pretrain.bert4rec.dim=16", "pretrain.bert4rec.n_heads=2", "pretrain.bert4rec.n_layers=1",
                 "pretrain.bert4rec.max_len=20", "pretrain.bert4rec.train.epochs=3",
                 "pretrain.bert4rec.train.eval_every=1", "pretrain.bert4rec.train.warmup_steps=2"],
}


@pytest.mark.parametrize("recipe", ["mf", "mf_softmax", "bert4rec"])
def test_pretrain_is_tracked_and_the_logged_model_gives_the_same_scores(tiny_prepared, mlflow_uri, tmp_path, recipe):
    model = recipe.split("_")[0]
    cfg = load_config(None, [f"pretrain.model={model}", *TINY[recipe]]).pretrain
    res = pretrain(tiny_prepared["prepared"], cfg, tmp_path / "run", tracker=MLflowTracker(mlflow_uri))
    assert 0.0 <= res.test["ndcg_at_10"] <= 1.0 and res.test["users"] > 100

    client = MlflowClient(mlflow_uri)
    run = client.get_run(res.run_id)
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "events"  # named after the dataset
    assert run.data.params[f"{model}.dim"] == "16" and run.data.params["data.items"] == "80"
    assert run.data.tags["model_type"] == model and len(run.data.tags["dataset_sha256"]) == 64
    assert "git_commit" in run.data.tags
    assert run.data.metrics["test/ndcg_at_10"] == pytest.approx(res.test["ndcg_at_10"])
    assert "test/popularity_ndcg_at_10" in run.data.metrics
    steps = [m.step for m in client.get_metric_history(res.run_id, "valid/ndcg_at_10")]
    # one namespace: the validation curve, then the chosen model's validation at the last step
    hist = client.get_metric_history(res.run_id, "valid/ndcg_at_10")
    assert hist[-1].step == res.fit.epochs_run and hist[-1].value == pytest.approx(res.valid["ndcg_at_10"])
    steps = steps[:-1]
    assert not client.get_metric_history(res.run_id, "val/ndcg_at_10")
    if recipe == "mf":  # closed form: one solve and one validation per setting of the grid
        assert steps == [1, 2, 3, 4, 5, 6] and res.fit.stopped == "closed_form"
        assert {"regularization", "alpha"} <= set(json.loads((res.model_dir / "model.json").read_text())["chosen"])
    else:  # the loop validates every eval_every epochs
        assert steps == sorted(steps) and len(steps) >= 2
    assert len(client.get_metric_history(res.run_id, "train/loss")) == res.fit.epochs_run
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.name == "events"
    names = {a.path for a in client.list_artifacts(res.run_id)}
    assert {"training_curve.png", "config.json", "metrics.json", "model_dir", "checkpoints"} <= names
    files = {a.path for a in client.list_artifacts(res.run_id, "model_dir")}
    assert {"model_dir/item_embeddings.npy", "model_dir/weights.pt", "model_dir/vocab.json"} <= files

    # The logged model loads back from MLflow and scores (user, item) pairs exactly as the trained model.
    logged = [m for m in client.search_logged_models([run.info.experiment_id]) if m.source_run_id == res.run_id]
    scorer = load_pyfunc(f"models:/{logged[0].model_id}", mlflow_uri)
    net, meta, vocab = load_model_dir(res.model_dir)
    data = load_prepared(tiny_prepared["prepared"])
    users = np.arange(0, 20)
    with torch.no_grad():
        if model == "mf":
            expected = net.score_users(torch.from_numpy(users)).numpy()  # (20, n_items)
        else:
            full = data.full_sequences()
            expected = net(net.query_inputs([full[u] for u in users]))[0].numpy()
    items = np.arange(1, data.n_items + 1)
    pairs = pd.DataFrame({"user_id": np.repeat(vocab.user_ids(users), len(items)),
                          "item_id": np.tile(vocab.item_ids(items), len(users))})
    got = scorer.predict(pairs).reshape(len(users), len(items))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # and the saved model directory evaluates to the logged test metrics
    assert evaluate(net, data, "test")["ndcg_at_10"] == pytest.approx(res.test["ndcg_at_10"], abs=1e-9)


def test_unknown_ids_score_nan(tiny_prepared, mlflow_uri, tmp_path):
    cfg = load_config(None, ["pretrain.model=mf", *TINY["mf"]]).pretrain
    tracker = MLflowTracker(mlflow_uri)
    res = pretrain(tiny_prepared["prepared"], cfg, tmp_path / "run", tracker=tracker)
    client = MlflowClient(mlflow_uri)
    run = client.get_run(res.run_id)
    logged = [m for m in client.search_logged_models([run.info.experiment_id]) if m.source_run_id == res.run_id]
    scorer = load_pyfunc(f"models:/{logged[0].model_id}", mlflow_uri)
    out = scorer.predict(pd.DataFrame({"user_id": [1, 999999], "item_id": [999999, 1]}))
    assert np.isnan(out).all()
