"""`recsys-pretrain tune`: a real Optuna study over real pretrain runs, tracked in a real MLflow store."""

import json

import pytest
import yaml
from mlflow.tracking import MlflowClient

from recsys_pretrain.cli import main
from recsys_pretrain.config import ConfigError, load_config
from recsys_pretrain.tune import resolve_space

# MF softmax on the tiny data: six epochs, validated after each, so the median pruner has epochs to compare.
TINY_MF = ["mf.loss=softmax", "mf.dim=16", "mf.train.epochs=6", "mf.train.eval_every=1", "mf.train.patience=6",
           "mf.train.progress=false"]
TINY_SEARCH = ["tune.seed=7", "tune.minutes=10", "tune.trial_max_minutes=2", "tune.sampler_startup_trials=2",
               "tune.pruner_startup_trials=2", "tune.pruner_warmup_steps=0",
               "tune.space={mf.dim: {type: categorical, choices: [8, 32]}, "
               "mf.train.lr: {type: float, low: 0.001, high: 0.05, log: true}}"]


def _tune(prepared, out, uri, capsys) -> dict:
    code = main(["tune", "--model", "mf", "--data", str(prepared), "--trials", "4", "--out", str(out),
                 f"pretrain.tracking_uri={uri}", *TINY_MF, *TINY_SEARCH])
    assert code == 0
    return json.loads(capsys.readouterr().out)


def test_tune_end_to_end(tiny_prepared, mlflow_uri, tmp_path, capsys):
    prepared = tiny_prepared["prepared"]
    summary = _tune(prepared, tmp_path / "tune", mlflow_uri, capsys)
    trials = summary["trials"]
    assert trials["run"] == 4 and trials["complete"] + trials["pruned"] == 4 and trials["complete"] >= 1
    assert summary["stopped"] == "n_trials"

    # MLflow: one parent, a nested run per trial carrying its state; the pruned ones ended FAILED
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.run_name == "tune-mf-events" and parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    states = {int(r.data.tags["optuna.trial_number"]): r.data.tags["optuna.state"] for r in children}
    assert sorted(states) == [0, 1, 2, 3] and set(states.values()) <= {"COMPLETE", "PRUNED"}
    assert list(states.values()).count("PRUNED") == trials["pruned"]
    for r in children:
        assert r.info.status == ("FINISHED" if r.data.tags["optuna.state"] == "COMPLETE" else "FAILED")
        assert "optuna.mf.dim" in r.data.params and "optuna.mf.train.lr" in r.data.params
        assert not any(k.startswith("test") for k in r.data.metrics)  # test metrics: the best trial's only
    best_run = client.get_run(summary["best_run_id"])
    assert best_run.data.tags["optuna.state"] == "COMPLETE"
    assert best_run.data.metrics["valid/ndcg_at_10"] == pytest.approx(summary["best_value"])
    assert parent.data.metrics["best/val_ndcg_at_10"] == pytest.approx(summary["best_value"])
    assert parent.data.metrics["best/test/ndcg_at_10"] == pytest.approx(summary["test"]["ndcg_at_10"])
    assert parent.data.params["best.mf.dim"] == str(summary["best_params"]["mf.dim"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "best.yaml", "optimization_history.png", "model_dir"} <= artifacts

    # the outputs: best.yaml, the summary, and the best trial's directory only
    out = tmp_path / "tune"
    assert sorted(p.name for p in (out / "trials").iterdir() if not p.name.startswith(".")) == [
        f"{summary['best_trial']:03d}"]
    cfg = load_config(summary["best_yaml"])
    for key, value in summary["best_params"].items():  # dotted keys under the pretrain section
        node = cfg.pretrain
        for part in key.split("."):
            node = getattr(node, part)
        assert node == value
    assert cfg.pretrain.model == "mf" and cfg.pretrain.mf.loss == "softmax" and cfg.pretrain.resume == "match"
    assert json.loads((out / "tune.json").read_text())["best_value"] == summary["best_value"]

    # retraining from best.yaml reproduces the best trial (same train.seed)
    assert main(["--config", summary["best_yaml"], "pretrain", "--model", "mf", "--data", str(prepared),
                 "--out", str(tmp_path / "again"), "--no-tracking"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["valid"]["ndcg_at_10"] == pytest.approx(summary["best_value"], abs=1e-9)

    # the study is seeded: a second search samples the same trials and ends the same way
    second = _tune(prepared, tmp_path / "tune2", mlflow_uri, capsys)
    first_rows = json.loads((out / "tune.json").read_text())["trials_detail"]
    second_rows = json.loads((tmp_path / "tune2" / "tune.json").read_text())["trials_detail"]
    assert [(r["params"], r["state"]) for r in first_rows] == [(r["params"], r["state"]) for r in second_rows]
    assert second["best_value"] == pytest.approx(summary["best_value"])


def test_space_keys_are_checked_before_any_trial(tiny_prepared, tmp_path, capsys):
    base = load_config(None, ["tune.model=mf"])
    with pytest.raises(ConfigError, match=r"unknown config key.*pretrain\.mf\.train\.lrr"):
        resolve_space(load_config(None, ["tune.model=mf", "tune.space={mf.train.lrr: {type: float, low: 0.001, "
                                         "high: 0.1}}"]).tune, base.pretrain)
    with pytest.raises(ConfigError, match="not a setting of the tuned model 'mf'"):
        resolve_space(load_config(None, ["tune.model=mf", "tune.space.bert4rec.dim={type: int, low: 8, "
                                         "high: 64}"]).tune, base.pretrain)
    with pytest.raises(ConfigError, match="integer setting"):
        resolve_space(load_config(None, ["tune.model=mf", "tune.space.mf.dim={type: float, low: 8, "
                                         "high: 64}"]).tune, base.pretrain)
    with pytest.raises(ConfigError, match="type 'uniform'"):
        resolve_space(load_config(None, ["tune.model=mf", "tune.space.mf.dim={type: uniform}"]).tune,
                      base.pretrain)
    # the default spaces are valid for every model (sasrec is the default one)
    default = load_config(None)
    assert set(resolve_space(default.tune, default.pretrain)) == {
        "sasrec.train.lr", "sasrec.dim", "sasrec.max_len", "sasrec.dropout", "sasrec.train.batch_size"}
    b4r = load_config(None, ["tune.model=bert4rec"])
    assert set(resolve_space(b4r.tune, b4r.pretrain)) == {
        "bert4rec.train.lr", "bert4rec.dim", "bert4rec.max_len", "bert4rec.mask_prob", "bert4rec.dropout",
        "bert4rec.train.batch_size"}
    softmax = load_config(None, ["tune.model=mf", "pretrain.mf.loss=softmax"])
    assert "mf.train.lr" in resolve_space(softmax.tune, softmax.pretrain)
    # through the CLI: a clear error, exit 2, nothing trained
    assert main(["tune", "--model", "mf", "--data", str(tiny_prepared["prepared"]), "--out", str(tmp_path / "t"),
                 "--no-tracking", "tune.space.mf.dimm={type: int, low: 8, high: 64}"]) == 2
    err = capsys.readouterr().err
    assert "tune.space.mf.dimm" in err and "unknown config key" in err
    assert not (tmp_path / "t").exists()


def test_best_yaml_keeps_credentials_out(tmp_path):
    from recsys_pretrain.tune import best_config_yaml

    cfg = load_config(None, ["pretrain.tracking_uri=https://user:secret@mlflow.example.com"])
    text = best_config_yaml(cfg, cfg.pretrain, "header")
    assert "secret" not in text and yaml.safe_load(text)["pretrain"]["tracking_uri"] is None
