"""The nightly flow under Prefect's test harness, on the tiny config, with a real MLflow store."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.testing.utilities import prefect_test_harness

from flows.deploy import deployment_kwargs
from flows.nightly import nightly
from recsys_pretrain import cli
from recsys_pretrain import nightly as N
from recsys_pretrain.config import load_config
from recsys_pretrain.registry import get_alias_version
from tests.conftest import ROOT

TINY = str(ROOT / "configs" / "tiny.yaml")


def _published(parent):
    """The one output published in `parent` (its version directories sit beside it, hidden)."""
    (out,) = [p for p in parent.iterdir() if not p.name.startswith(".")]
    return out


def _first_user(tmp):
    from recsys_pretrain.vocab import Vocab

    prepared = _published(tmp / "data" / "tiny" / "prepared")
    return Vocab.load(prepared / "vocab.json").users[0]


@pytest.fixture(scope="module", autouse=True)
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def flow_env(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return [f"data_dir={tmp_path / 'data'}", f"flow.tracking_uri={uri}"], uri, tmp_path


def test_first_night_promotes_publishes_and_a_worse_challenger_is_rejected(flow_env, monkeypatch, capsys):
    overrides, uri, tmp = flow_env
    calls = {"ingest": 0}
    real_ingest = N.ingest_step

    def flaky_ingest(inputs, cfg):
        calls["ingest"] += 1
        if calls["ingest"] == 1:
            raise OSError("transient: the log store hung up")  # the task's retries must absorb this
        return real_ingest(inputs, cfg)

    monkeypatch.setattr(N, "ingest_step", flaky_ingest)
    first = nightly(TINY, overrides)
    assert calls["ingest"] == 2  # failed once, retried once
    assert not first.get("stopped")
    assert all(p["promoted"] for p in first["promotions"]) and len(first["promotions"]) == 2
    assert get_alias_version("recsys-mf", "champion", uri)["version"] == 1
    assert get_alias_version("recsys-bert4rec", "champion", uri)["version"] == 1
    current = json.loads((tmp / "data" / "tiny" / "serving" / "current.json").read_text())
    assert current["model"] == "models:/recsys-bert4rec@champion" and (tmp / current["path"]).exists()
    ranker = first["ranker"]  # tiny data: the AUC itself is noise here, its presence and range are not
    assert 0.0 <= ranker["test"]["click_auc"] <= 1.0 and (tmp / ranker["ranker_dir"] / "ranker.json").exists()
    assert ranker["registered"]["promoted"] and get_alias_version("recsys-ranker", "champion", uri)["version"] == 1
    assert not first["models"]["mf"]["warm_start"] and "closed form" in first["models"]["mf"]["init"]
    assert not first["models"]["bert4rec"]["warm_start"] and "no champion" in first["models"]["bert4rec"]["init"]

    # what `make run` prints after the flow: the UI command, the champions' metrics, a served answer
    report = N.where_things_are(load_config(TINY, overrides), uri)
    assert f"mlflow ui --backend-store-uri {uri}" in report
    assert "recsys-mf v1" in report and "test/ndcg_at_10" in report and "recsys-ranker v1" in report
    assert "| 1 |" in report and "| 5 |" in report  # five recommended items from the published index

    # the CLI answers from what the flow published, re-ranked by the registered ranker
    pointer = str(tmp / "data" / "tiny" / "serving" / "current.json")
    user = _first_user(tmp)
    argv = ["--config", TINY, "recommend", "--index", pointer, "--user", str(user), "-k", "5", "--json",
            "--reranker", "models:/recsys-ranker@champion", f"pretrain.tracking_uri={uri}"]
    capsys.readouterr()
    assert cli.main(argv) == 0
    answer = json.loads(capsys.readouterr().out)[0]
    assert answer["reranked"] is True and len(answer["items"]) == 5 and answer["fallback"] is None

    client = MlflowClient(uri)
    parent = client.get_run(first["mlflow_run_id"])
    flow_run_id = parent.data.tags["prefect_flow_run_id"]
    assert flow_run_id
    children = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) >= 4  # mf, bert4rec, pre-T1 pretraining, fine-tuning (+ the index build)
    mf_run = client.get_run(first["models"]["mf"]["run_id"])
    assert mf_run.data.tags["prefect_flow_run_id"] == flow_run_id and mf_run.data.tags["promotion"] == "promoted"
    assert "**mf**: test NDCG@10" in first["summary"] and "PROMOTED" in first["summary"]
    with get_client(sync_client=True) as client_:
        arts = client_.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["nightly-summary"])))
    assert arts and first["mlflow_run_id"] in arts[-1].data  # the Prefect artifact links the MLflow run

    # Night two, the same log: ingest is not run again (cached on the content hash). A deliberately
    # worse mf (one epoch of gradient descent at a tiny learning rate) does not beat the champion on the same test set.
    worse = [*overrides, "pretrain.mf.loss=softmax", "pretrain.mf.train.epochs=1", "pretrain.mf.train.lr=1e-6",
             "flow.models=[mf]",
             "flow.finetune=false", "flow.warm_start=false"]
    second = nightly(TINY, worse)
    assert calls["ingest"] == 2
    decision = second["promotions"][0]
    assert decision["promoted"] is False and "does not beat" in decision["reasons"][0]
    assert decision["version"] == 2 and get_alias_version("recsys-mf", "champion", uri)["version"] == 1
    assert client.get_run(second["models"]["mf"]["run_id"]).data.tags["promotion"] == "rejected"


def test_quality_gate_stops_a_night_that_looks_wrong(flow_env):
    overrides, uri, tmp = flow_env
    overrides = [*overrides, "pretrain.mf.loss=softmax"]  # mf by gradient descent: it warm-starts on night three
    nightly(TINY, [*overrides, "flow.models=[mf]", "flow.finetune=false"])
    # tonight's log is a fifth of last night's: the volume bound stops the flow before training
    small = nightly(TINY, [*overrides, "flow.models=[mf]", "flow.finetune=false", "synth.n_users=40",
                           "synth.seed=5"])
    assert small["stopped"].startswith("data-quality gate") and "volume" in small["stopped"]
    assert small["models"] == {} and get_alias_version("recsys-mf", "champion", uri)["version"] == 1

    # The next good night warm-starts from the champion (night 1 trained from scratch: nothing to start from).
    third = nightly(TINY, [*overrides, "flow.models=[mf]", "flow.finetune=false"])
    assert third["models"]["mf"]["warm_start"] and third["models"]["mf"]["init"].startswith("warm start from champion v1")
    run = MlflowClient(uri).get_run(third["models"]["mf"]["run_id"])
    assert run.data.tags["init"] == "warm start" and run.data.params["warm_start.item_overlap"] == "1.0"

    # A user is forgotten after the champion was trained: the next night trains from scratch.
    from recsys_pretrain.data.forget import forget

    cfg = load_config(TINY, [*overrides, "flow.models=[mf]"])
    prepared = str(_published(tmp / "data" / "tiny" / "prepared"))
    assert N.warm_start_source("mf", prepared, cfg, uri)[0] is not None
    ingested = tmp / "data" / "tiny" / "ingested" / Path(prepared).name  # the night the champion learnt from
    assert forget(ingested, [_first_user(tmp)])["changed"]
    source, why = N.warm_start_source("mf", prepared, cfg, uri)
    assert source is None and "forgotten" in why


def test_deployment_has_the_configured_schedule():
    dep = nightly.to_deployment(**deployment_kwargs(TINY))
    assert dep.name == "nightly"
    assert [s.schedule.cron for s in dep.schedules] == ["0 2 * * *"]
    assert dep.parameters == {"config": TINY}
    assert dep.concurrency_limit == 1  # a night that overruns is not joined by the next one
