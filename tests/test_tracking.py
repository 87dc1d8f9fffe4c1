"""Tracking against a real SQLite MLflow store in tmp_path: what the Tracker logs is really in the store."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import polars as pl
import pytest
import torch
from mlflow.tracking import MlflowClient

from recsys_pretrain.pyfunc import EmbeddingScorer, log_ranker, log_recommender, scorer_input_example
from recsys_pretrain.registry import (
    download_artifacts,
    get_alias_version,
    get_model_version,
    load_pyfunc,
    parse_models_uri,
    register_model,
    resolve_model_dir,
    set_alias,
)
from recsys_pretrain.tracking import (
    MAX_PARAM_CHARS,
    MLflowTracker,
    NullTracker,
    Tracker,
    git_commit,
    pip_requirements,
    resolve_tracking_uri,
    run_metrics,
    safe_key,
)
from recsys_pretrain.vocab import Vocab

ROOT = Path(__file__).resolve().parents[1]
IN_FEATURES = 4

# SQLAlchemy 2.1 deprecation raised inside MLflow's ORM setup; pytest shows DeprecationWarnings, Python doesn't.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory) -> Path:
    """A migrated, empty MLflow sqlite database; creating one costs seconds, copying it does not."""
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    uri = f"sqlite:///{db}"
    MlflowClient(tracking_uri=uri).search_experiments()  # creates the tables
    return db


@pytest.fixture
def store(tmp_path, monkeypatch, empty_db):
    """(tracking_uri, MLflowTracker, MlflowClient) on a fresh sqlite store; the process cwd is an empty dir."""
    # setenv then delenv so monkeypatch restores the variables that mlflow.set_tracking_uri writes.
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(var, "unset")
        monkeypatch.delenv(var)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # anything MLflow drops in ./mlruns would show up here
    uri = resolve_tracking_uri(None, data_dir=tmp_path / "data")
    assert uri == f"sqlite:///{tmp_path / 'data' / 'mlflow.db'}"
    shutil.copyfile(empty_db, tmp_path / "data" / "mlflow.db")
    tracker = MLflowTracker(uri)
    yield uri, tracker, MlflowClient(tracking_uri=uri, registry_uri=uri)
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def _read_artifact(client: MlflowClient, run_id: str, path: str, dst: Path) -> Path:
    return Path(client.download_artifacts(run_id, path, str(dst)))


def test_params_metrics_tags_and_artifacts_land_in_the_store(store, tmp_path):
    uri, tracker, client = store
    note = tmp_path / "note.txt"
    note.write_text("hello")
    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [3, 1, 2])
    model_dir = tmp_path / "model_dir"
    (model_dir / "sub").mkdir(parents=True)
    (model_dir / "model.json").write_text('{"dim": 8}')
    (model_dir / "sub" / "weights.bin").write_bytes(b"\x00\x01")

    with tracker.start_run("pretrain", "stage", tags={"stage": "pretrain"}, description="desc") as run_id:
        assert tracker.run_id == run_id
        tracker.log_params({"model": {"dim": 64, "lr": 0.001}, "name": "sasrec", "long": "x" * 7000})
        for step, loss in enumerate([0.9, 0.5, 0.25]):
            tracker.log_metrics({"loss": loss, "recall@10": step / 10}, step=step * 100)
        tracker.set_tags({"dataset": "synthetic", "epochs": 3})
        tracker.log_artifact(note)
        tracker.log_artifact(note, artifact_path="notes")
        tracker.log_dict({"items": 3, "path": Path("/x")}, "summary")
        tracker.log_figure(fig, "loss_curve")
        tracker.log_model_dir(model_dir, name="model")
    plt.close(fig)
    assert tracker.run_id is None

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "stage"
    params = run.data.params
    assert params["model.dim"] == "64" and params["model.lr"] == "0.001" and params["name"] == "sasrec"
    assert len(params["long"]) == MAX_PARAM_CHARS and params["long"].endswith("[truncated]")
    assert run.data.tags["stage"] == "pretrain" and run.data.tags["epochs"] == "3"
    assert run.data.tags["mlflow.note.content"] == "desc"
    assert run.data.tags.get("mlflow.source.git.commit") == git_commit()

    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (0, 0.9),
        (100, 0.5),
        (200, 0.25),
    ]
    # "@" is not allowed in MLflow names: ranking metrics are stored as recall_at_10
    assert run_metrics(run_id, uri) == {"loss": 0.25, "recall_at_10": 0.2}
    assert [m.step for m in client.get_metric_history(run_id, "recall_at_10")] == [0, 100, 200]

    top = {f.path for f in client.list_artifacts(run_id)}
    assert {"note.txt", "notes", "summary.json", "loss_curve.png", "model"} <= top
    assert [f.path for f in client.list_artifacts(run_id, "notes")] == ["notes/note.txt"]
    dst = tmp_path / "dl"
    dst.mkdir()
    assert json.loads(_read_artifact(client, run_id, "summary.json", dst).read_text()) == {
        "items": 3,
        "path": "/x",
    }
    assert _read_artifact(client, run_id, "loss_curve.png", dst).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fetched = download_artifacts(run_id, "model", uri, dst_path=tmp_path / "fetched")
    assert fetched == tmp_path / "fetched" / "model"
    assert (fetched / "model.json").read_text() == '{"dim": 8}'
    assert (fetched / "sub" / "weights.bin").read_bytes() == b"\x00\x01"

    # artifacts sit beside the database, not in ./mlruns of whatever directory the process ran in
    assert run.info.artifact_uri.startswith((tmp_path / "data" / "mlartifacts").as_uri())
    assert (tmp_path / "data" / "mlartifacts" / "pretrain").is_dir()
    assert list((tmp_path / "cwd").iterdir()) == []


def test_logging_outside_a_run_fails_and_a_raising_block_marks_the_run_failed(store):
    _, tracker, client = store
    with pytest.raises(RuntimeError, match="no active run"):
        tracker.log_metrics({"loss": 1.0}, step=0)
    with pytest.raises(ValueError, match="boom"):
        with tracker.start_run("pretrain", "crashes") as run_id:
            raise ValueError("boom")
    assert client.get_run(run_id).info.status == "FAILED"
    assert tracker.run_id is None


def test_nested_runs_carry_the_parent_run_id(store):
    _, tracker, client = store
    seen: dict[str, str] = {}

    def stage_in_worker_thread(parent: str) -> None:
        # another thread has no active MLflow run: the parent must be passed explicitly
        with tracker.start_run("flow", "threaded-stage", parent_run_id=parent) as rid:
            tracker.log_metrics({"x": 1.0}, step=0)
            seen["threaded"] = rid

    with tracker.start_run("flow", "flow-run") as parent:
        with tracker.start_run("flow", "ingest", nested=True) as child:
            assert tracker.run_id == child
            tracker.log_params({"k": 1})
        assert tracker.run_id == parent
        worker = threading.Thread(target=stage_in_worker_thread, args=(parent,))
        worker.start()
        worker.join()

    assert "threaded" in seen
    parent_run = client.get_run(parent)
    assert "mlflow.parentRunId" not in parent_run.data.tags
    assert parent_run.data.params == {}  # the child's params went to the child
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(child).data.params == {"k": "1"}
    assert client.get_run(seen["threaded"]).data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(seen["threaded"]).data.metrics == {"x": 1.0}


def test_log_input_records_the_dataset_with_row_counts(store, tmp_path):
    _, tracker, client = store
    events = tmp_path / "events.parquet"
    events.write_bytes(b"not really parquet")
    digest = hashlib.sha256(b"events").hexdigest()  # 64 chars: longer than MLflow's 36-char digest
    counts = {"events": 1000, "users": 50, "items": 80}

    with tracker.start_run("pretrain", "ingest") as run_id:
        tracker.log_input("events", digest, counts, str(events), context="training")
        tracker.log_input("synthetic", "abc123", {"events": 5}, "synthetic:seed=7")

    inputs = {d.dataset.name: d for d in client.get_run(run_id).inputs.dataset_inputs}
    assert set(inputs) == {"events", "synthetic"}
    ds = inputs["events"]
    assert ds.dataset.digest == digest[:36]
    assert json.loads(ds.dataset.profile) == counts
    assert ds.dataset.source_type == "local"
    assert str(events) in ds.dataset.source
    tags = {t.key: t.value for t in ds.tags}
    assert tags == {"mlflow.data.context": "training", "digest": digest}
    other = inputs["synthetic"]
    assert other.dataset.digest == "abc123"
    assert json.loads(other.dataset.profile) == {"events": 5}
    assert other.dataset.source_type == "code"  # not a path or URI: kept as text
    assert "synthetic:seed=7" in other.dataset.source


class LinearScorer(mlflow.pyfunc.PythonModel):
    """Scores rows with a torch.nn.Linear loaded from the `checkpoint` artifact directory."""

    def load_context(self, context):
        self.module = torch.nn.Linear(IN_FEATURES, 1)
        state = torch.load(Path(context.artifacts["checkpoint"]) / "linear.pt", weights_only=True)
        self.module.load_state_dict(state)
        self.module.eval()

    def predict(self, context, model_input: pd.DataFrame, params=None):
        x = torch.as_tensor(model_input.to_numpy(dtype=np.float32))
        with torch.no_grad():
            return self.module(x).squeeze(1).numpy()


def test_pyfunc_model_round_trips_through_the_registry_alias(store, tmp_path):
    uri, tracker, client = store
    torch.manual_seed(0)
    module = torch.nn.Linear(IN_FEATURES, 1)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save(module.state_dict(), ckpt / "linear.pt")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(16, IN_FEATURES)).astype(np.float32), columns=list("abcd"))
    with torch.no_grad():
        expected = module(torch.from_numpy(frame.to_numpy(copy=True))).squeeze(1).numpy()

    assert get_alias_version("scorer", "champion", uri) is None  # no such model yet
    with tracker.start_run("finetune", "train") as run_id:
        tracker.log_metrics({"ndcg@10": 0.3}, step=0)
        assert run_metrics(run_id, uri) == {"ndcg_at_10": 0.3}
        model_uri = tracker.log_pyfunc_model(
            LinearScorer(), "scorer", artifacts={"checkpoint": str(ckpt)}, input_example=frame.head(2)
        )
        # registering while logging goes through MLflow's global registry URI, set by the tracker
        direct_uri = tracker.log_pyfunc_model(
            LinearScorer(),
            "scorer",
            artifacts={"checkpoint": str(ckpt)},
            input_example=frame.head(2),
            registered_model_name="scorer-direct",
        )
    assert model_uri.startswith("models:/") and direct_uri != model_uri
    direct = client.get_model_version("scorer-direct", "1")
    assert direct.source == direct_uri and direct.run_id == run_id

    version = register_model(model_uri, "scorer", uri)
    assert version == 1
    assert get_alias_version("scorer", "champion", uri) is None  # model exists, alias does not
    set_alias("scorer", "champion", version, uri)
    info = get_alias_version("scorer", "champion", uri)
    assert info is not None and info["version"] == 1 and info["run_id"] == run_id
    assert info["source"] == model_uri
    assert register_model(model_uri, "scorer", uri) == 2  # a second version of an existing model
    set_alias("scorer", "champion", 2, uri)
    assert get_alias_version("scorer", "champion", uri)["version"] == 2  # the alias moved

    loaded = load_pyfunc("models:/scorer@champion", uri)
    scores = np.asarray(loaded.predict(frame))
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(scores, expected)

    # the logged environment names installable versions only
    model_dir = client.get_model_version_download_uri("scorer", "1")
    reqs = Path(mlflow.artifacts.download_artifacts(f"{model_dir}/requirements.txt")).read_text()
    assert "torch==" + torch.__version__.split("+")[0] in reqs.splitlines()
    assert "+" not in reqs


def test_resolve_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert resolve_tracking_uri("sqlite:///cfg.db", tmp_path) == "sqlite:///cfg.db"
    assert resolve_tracking_uri(None, tmp_path) == "http://tracking.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    data_dir = tmp_path / "nested" / "data"
    assert not data_dir.exists()
    monkeypatch.chdir(tmp_path)
    uri = resolve_tracking_uri(None, "nested/data")
    assert uri == f"sqlite:///{data_dir.resolve() / 'mlflow.db'}"
    assert uri.startswith("sqlite:////")  # absolute path: independent of the later cwd
    assert data_dir.is_dir()


def test_null_tracker_records_what_it_was_given(tmp_path):
    model_dir = tmp_path / "model"
    (model_dir / "sub").mkdir(parents=True)
    (model_dir / "model.json").write_text("{}")
    (model_dir / "sub" / "w.pt").write_text("")
    tracker = NullTracker()
    assert isinstance(tracker, Tracker)
    with tracker.start_run("flow", "flow-run") as parent:
        with tracker.start_run("flow", "stage", nested=True, tags={"a": 1}) as child:
            assert tracker.run_id == child != parent
            tracker.log_params({"opt": {"lr": 0.01}, "long": "y" * 9000})
            tracker.log_metrics({"loss": 2.0}, step=0)
            tracker.log_metrics({"loss": 1.0}, step=5)
            tracker.log_metrics({"hr@10": 0.5}, step=5)
            tracker.set_tags({"k": 3})
            tracker.log_artifact("/some/where/file.bin", artifact_path="ckpt")
            tracker.log_dict({"n": 1}, "summary")
            tracker.log_figure(object(), "curve")
            tracker.log_model_dir(model_dir)
            tracker.log_input("events", "d1", {"events": 10}, "data/events.parquet")
            uri = tracker.log_pyfunc_model(object(), "scorer", {"checkpoint": "/ckpt"}, None, "scorer")
    with pytest.raises(KeyError), tracker.start_run("flow", "bad"):
        raise KeyError("x")

    assert tracker.run_id is None
    assert [(r["run_name"], r["parent_run_id"], r["status"]) for r in tracker.runs] == [
        ("flow-run", None, "FINISHED"),
        ("stage", parent, "FINISHED"),
        ("bad", None, "FAILED"),
    ]
    assert tracker.runs[1]["tags"] == {"a": "1"}
    assert tracker.params["opt.lr"] == "0.01" and len(tracker.params["long"]) == MAX_PARAM_CHARS
    assert tracker.metrics == {"loss": [(0, 2.0), (5, 1.0)], "hr_at_10": [(5, 0.5)]}
    assert tracker.tags == {"k": "3"}
    assert tracker.artifacts == [
        "ckpt/file.bin",
        "summary.json",
        "curve.png",
        "model/model.json",
        "model/sub/w.pt",
    ]
    assert tracker.dicts == {"summary.json": {"n": 1}}
    assert tracker.inputs[0]["counts"] == {"events": 10}
    assert tracker.models[0]["registered_model_name"] == "scorer" and tracker.models[0]["uri"] == uri


def test_mlflow_tracker_satisfies_the_protocol(store):
    _, tracker, _ = store
    assert isinstance(tracker, Tracker)


def test_git_commit_and_pip_requirements(tmp_path):
    assert git_commit(tmp_path) is None
    if (ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", git_commit(ROOT) or "")
    reqs = pip_requirements()
    assert f"torch=={torch.__version__.split('+')[0]}" in reqs
    assert f"mlflow=={mlflow.__version__}" in reqs
    assert not any("+" in r for r in reqs)


def test_safe_key_maps_ranking_metric_names_to_names_mlflow_accepts():
    assert safe_key("recall@10") == "recall_at_10"
    assert safe_key("eval/ndcg@20") == "eval/ndcg_at_20"
    assert safe_key("a,b(c)") == "a_b_c_"
    assert safe_key("ok-name_1.x: y") == "ok-name_1.x: y"


def test_model_sources_resolve_to_one_local_directory(store, tmp_path):
    """registry.resolve_model_dir: a directory as it is; a run, runs:/, models:/NAME@ALIAS and
    models:/NAME/VERSION to the run's `model_dir` artifact; anything else refused by name."""
    uri, tracker, _ = store
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.json").write_text('{"model": "mf"}')
    with tracker.start_run("sources", "mf") as run_id:
        tracker.log_model_dir(model_dir, name="model_dir")
    version = register_model(f"runs:/{run_id}/model_dir", "tiny", uri)
    set_alias("tiny", "champion", version, uri)

    assert resolve_model_dir(model_dir) == model_dir  # no store needed
    for source in (run_id, f"runs:/{run_id}", "models:/tiny@champion", f"models:/tiny/{version}"):
        got = resolve_model_dir(source, uri, cache_dir=tmp_path / "cache")
        assert got == tmp_path / "cache" / run_id / "model_dir"
        assert (got / "model.json").read_text() == '{"model": "mf"}'
    assert (resolve_model_dir(f"models:/tiny/{version}", uri) / "model.json").exists()  # no cache: a temp dir
    assert get_model_version("tiny", version, uri)["run_id"] == run_id
    assert get_model_version("tiny", 7, uri) is None and get_model_version("absent", 1, uri) is None
    with pytest.raises(FileNotFoundError, match="version 7"):
        resolve_model_dir("models:/tiny/7", uri)
    with pytest.raises(FileNotFoundError, match="alias"):
        resolve_model_dir("models:/tiny@nope", uri)
    with pytest.raises(ValueError, match="models:/NAME/VERSION"):
        resolve_model_dir("models:/m-0123456789abcdef", uri)  # a logged-model id names no run's model_dir
    with pytest.raises(ValueError, match="tracking_uri"):
        resolve_model_dir(run_id)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        resolve_model_dir(tmp_path / "nowhere", uri)


def test_parse_models_uri():
    assert parse_models_uri("models:/recsys-ranker@champion") == ("recsys-ranker", "champion", None)
    assert parse_models_uri("models:/recsys-ranker/3") == ("recsys-ranker", None, "3")
    for bad in ("models:/recsys-ranker", "models:/recsys-ranker/latest", "models:/@x", "models:/x@",
                "runs:/abc/model", "/tmp/model"):
        assert parse_models_uri(bad) is None


def test_pyfunc_models_log_through_the_null_tracker(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    np.save(model_dir / "item_embeddings.npy", np.eye(2, dtype=np.float32))
    np.save(model_dir / "user_embeddings.npy", np.ones((1, 2), dtype=np.float32))
    Vocab.from_ids(pl.Series(["u1"]), pl.Series(["i1", "i2"])).save(model_dir / "vocab.json")
    tracker = NullTracker()
    with tracker.start_run("flow", "stage"):
        uri = log_recommender(tracker, model_dir, name="model", registered_model_name="recsys-mf")
        with pytest.raises(FileNotFoundError, match="not a model directory"):
            log_recommender(tracker, tmp_path / "nowhere")
        with pytest.raises(FileNotFoundError, match="not a ranker directory"):
            log_ranker(tracker, model_dir)
    [logged] = tracker.models
    assert logged["uri"] == uri and logged["registered_model_name"] == "recsys-mf"
    assert isinstance(logged["python_model"], EmbeddingScorer)
    assert logged["artifacts"] == {"model_dir": str(model_dir)}
    assert list(scorer_input_example(model_dir).columns) == ["user_id", "item_id"]
