"""Experiment tracking: runs, params, metrics, artifacts, dataset inputs and logged models.

Library code talks to a `Tracker`; `MLflowTracker` writes to an MLflow store (SQLite by default),
`NullTracker` records in memory for unit tests. A stage logs a served model through
`log_pyfunc_model` with the `PythonModel` it chooses (`recsys_pretrain.pyfunc` holds the project's);
the model registry (versions, aliases, fetching models back) is `recsys_pretrain.registry`. This module
imports nothing from the project but `io`: tracking never imports a stage.

Layout of the default store: `<data_dir>/mlflow.db` plus `<data_dir>/mlartifacts/<experiment>/...`.
MLflow's own default would put artifacts in `./mlruns` under the *current directory*, so experiments
created here always get an explicit artifact location beside the database.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import itertools
import json
import logging
import os
import re
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import mlflow
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT
from mlflow.utils.validation import MAX_DATASET_DIGEST_SIZE, MAX_PARAM_VAL_LENGTH

from recsys_pretrain.io import pid_alive as _pid_alive

__all__ = [
    "MAX_PARAM_CHARS",
    "MLflowTracker",
    "NullTracker",
    "Tracker",
    "activate",
    "already_exists",
    "does_not_exist",
    "flatten_params",
    "git_commit",
    "mlflow_client",
    "pip_requirements",
    "quiet",
    "redact_uri",
    "resolve_tracking_uri",
    "run_metrics",
    "safe_key",
    "set_run_tags",
]

# MLflow 3.17 accepts param values up to 6000 chars (not the 500 of MLflow 1.x) and would truncate
# with a warning itself; truncating here keeps the log quiet and NullTracker identical.
MAX_PARAM_CHARS = MAX_PARAM_VAL_LENGTH
_TRUNCATED = "...[truncated]"

_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")
_DEFAULT_DB = "mlflow.db"
# Who started a run: a later run on the same host ends it as KILLED when that process is gone.
HOST_TAG, PID_TAG = "recsys.host", "recsys.pid"
_ARTIFACT_DIR = "mlartifacts"

# Packages a served model needs; pinned to what is installed so the logged environment is reproducible.
_MODEL_PACKAGES = ("torch", "numpy", "polars", "faiss-cpu", "scikit-learn", "scipy", "cloudpickle", "mlflow")


# --------------------------------------------------------------------------------------------------
# plain helpers


def resolve_tracking_uri(uri: str | None = None, data_dir: str | Path = "data") -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else sqlite:///<abs data_dir>/mlflow.db (directory created)."""
    if uri:
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = Path(data_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / _DEFAULT_DB}"


def redact_uri(uri: str) -> str:
    """A tracking URI without credentials (`https://user:secret@host` -> `https://***@host`), for what is
    written into summaries and artifacts."""
    if not uri:
        return uri
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[-1]))


def git_commit(cwd: str | Path | None = None) -> str | None:
    """`git rev-parse HEAD` in `cwd` (default: this package's source directory); None outside a repo."""
    # Default to the code's own directory: the commit describes the code that ran, wherever it ran from.
    where = Path(cwd) if cwd is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


def pip_requirements() -> list[str]:
    """Requirements for logged models: installed versions, `+local` suffixes stripped (`2.13.0+cpu`)."""
    reqs = []
    for pkg in _MODEL_PACKAGES:
        try:
            version = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            reqs.append(pkg)
            continue
        reqs.append(f"{pkg}=={version.split('+', 1)[0]}")
    return reqs


def safe_key(name: str) -> str:
    """A name MLflow accepts for a param, metric or tag: `recall@10` -> `recall_at_10`.

    MLflow allows only alphanumerics, `_ - . / :` and spaces; `@` (as in every ranking metric) is rejected.
    """
    name = str(name).replace("@", "_at_")
    return _BAD_KEY_CHARS.sub("_", name)


def _stringify(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _truncate(value: str, limit: int = MAX_PARAM_CHARS) -> str:
    return value if len(value) <= limit else value[: limit - len(_TRUNCATED)] + _TRUNCATED


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; dataclasses flatten like dicts; keys made safe, values truncated."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{safe_key(key)}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = _truncate(_stringify(value))
    return flat


def _figure_name(name: str) -> str:
    return name if name.lower().endswith(".png") else f"{name}.png"


def _json_name(name: str) -> str:
    return name if name.lower().endswith(".json") else f"{name}.json"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "experiment"


def _sqlite_artifact_root(uri: str) -> Path | None:
    """`<db dir>/mlartifacts` for a file-backed sqlite URI, else None (a server picks its own root)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///") :].split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    return Path(db).expanduser().resolve().parent / _ARTIFACT_DIR


def activate(tracking_uri: str) -> None:
    """Point MLflow's process-wide tracking and registry URIs at `tracking_uri`."""
    # The fluent API (start_run, pyfunc.log_model/load_model, models:/ resolution) reads process globals;
    # registry set too so an unrelated $MLFLOW_REGISTRY_URI cannot split runs from their models.
    if mlflow.get_tracking_uri() != tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_registry_uri() != tracking_uri:
        mlflow.set_registry_uri(tracking_uri)


def mlflow_client(tracking_uri: str) -> MlflowClient:
    """A client whose runs and registered models both live in `tracking_uri`."""
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _is(exc: BaseException, code: int) -> bool:
    return isinstance(exc, MlflowException) and exc.error_code == ErrorCode.Name(code)


def already_exists(exc: BaseException) -> bool:
    """Whether `exc` is MLflow's RESOURCE_ALREADY_EXISTS (e.g. another process created the model first)."""
    return _is(exc, RESOURCE_ALREADY_EXISTS)


def does_not_exist(exc: BaseException) -> bool:
    """Whether `exc` is MLflow's RESOURCE_DOES_NOT_EXIST (no such registered model, version or run)."""
    return _is(exc, RESOURCE_DOES_NOT_EXIST)


class _DropCloudpickleNotice(logging.Filter):
    # Logged on every pyfunc.log_model with a PythonModel instance, which is how this project logs models.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Passing a Python object as `python_model`")


@contextmanager
def quiet() -> Iterator[None]:
    """Silence MLflow's advisory warnings (schema hints, deprecations) around one call; errors still raise."""
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    notice = _DropCloudpickleNotice()
    pyfunc_log.addFilter(notice)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            yield
    finally:
        pyfunc_log.removeFilter(notice)


class _CountsDataset(MetaDataset):
    """A metadata-only dataset whose profile is the row counts (MetaDataset itself has no profile)."""

    def __init__(self, source, name: str, digest: str, counts: Mapping[str, int]):
        self._counts = {k: int(v) for k, v in counts.items()}
        super().__init__(source=source, name=name, digest=digest)

    @property
    def profile(self) -> dict[str, int]:
        return dict(self._counts)

    def to_dict(self) -> dict[str, str]:
        config = super().to_dict()
        config["profile"] = json.dumps(self.profile, sort_keys=True)
        return config


def _dataset_source(source: str):
    if "://" not in source and Path(source).exists():
        source = str(Path(source).resolve())  # a cwd-relative path means nothing once the run is over
    try:
        with quiet():
            return resolve_dataset_source(source)
    except MlflowException:
        # Not a path or URI MLflow knows (e.g. "synthetic:seed=7"): keep the text as a code source.
        return CodeDatasetSource({"source": source})


# --------------------------------------------------------------------------------------------------
# the interface


@runtime_checkable
class Tracker(Protocol):
    """What pipeline stages may record. All logging goes to the innermost run started by `start_run`."""

    def start_run(
        self,
        experiment: str,
        run_name: str,
        *,
        tags: dict | None = None,
        description: str | None = None,
        nested: bool = False,
        parent_run_id: str | None = None,
    ) -> AbstractContextManager[str]: ...

    def log_params(self, params: dict) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def set_tags(self, tags: dict) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_model_dir(self, path: str | Path, name: str = "model") -> None: ...

    def log_dict(self, obj: dict, name: str) -> None: ...

    def log_figure(self, fig, name: str) -> None: ...

    def log_input(
        self, name: str, digest: str, counts: dict[str, int], source: str, *, context: str | None = None
    ) -> None: ...

    def log_pyfunc_model(
        self,
        python_model,
        name: str,
        artifacts: dict[str, str],
        input_example,
        registered_model_name: str | None = None,
    ) -> str: ...

    @property
    def run_id(self) -> str | None: ...


# --------------------------------------------------------------------------------------------------
# MLflow


class MLflowTracker:
    """Tracker backed by an MLflow store at `tracking_uri` (see `resolve_tracking_uri`).

    One parent run per flow run, one nested run per stage: `start_run(..., nested=True)` inside an active
    run, or `parent_run_id=` from another thread/process (the fluent run stack is per thread).
    `artifact_root` overrides where new experiments keep artifacts (default: beside a sqlite db).
    """

    def __init__(self, tracking_uri: str, *, artifact_root: str | Path | None = None):
        self.tracking_uri = tracking_uri
        root = Path(artifact_root).expanduser().resolve() if artifact_root else None
        self.artifact_root = root or _sqlite_artifact_root(tracking_uri)
        activate(tracking_uri)
        self.client = mlflow_client(tracking_uri)
        self._local = threading.local()  # run stack per thread, mirroring MLflow's own active-run stack
        self._experiments: dict[str, str] = {}
        self._commit = git_commit()  # tagged on every run; one subprocess per tracker, not per stage

    # -- runs

    @property
    def _stack(self) -> list[str]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    @property
    def run_id(self) -> str | None:
        return self._stack[-1] if self._stack else None

    def _require_run(self) -> str:
        run_id = self.run_id
        if run_id is None:
            raise RuntimeError("no active run: wrap the logging calls in `with tracker.start_run(...)`")
        return run_id

    def experiment_id(self, experiment: str) -> str:
        """Id of `experiment`, created (with artifacts beside the db) when missing."""
        if experiment in self._experiments:
            return self._experiments[experiment]
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            location = (self.artifact_root / _slug(experiment)).as_uri() if self.artifact_root else None
            try:
                exp_id = self.client.create_experiment(experiment, artifact_location=location)
            except MlflowException as exc:  # another process created it first
                if not already_exists(exc):
                    raise
                exp_id = self.client.get_experiment_by_name(experiment).experiment_id
        else:
            exp_id = found.experiment_id
        self._experiments[experiment] = exp_id
        return exp_id

    @contextmanager
    def start_run(
        self,
        experiment: str,
        run_name: str,
        *,
        tags: dict | None = None,
        description: str | None = None,
        nested: bool = False,
        parent_run_id: str | None = None,
    ) -> Iterator[str]:
        """Start a run (nested under the active one with `nested=True`, or under `parent_run_id`); yields its id.

        The run ends FINISHED, or FAILED when the block raises.
        """
        activate(self.tracking_uri)
        exp_id = self.experiment_id(experiment)
        self.end_orphaned_runs(exp_id)
        run_tags = {safe_key(k): _stringify(v) for k, v in (tags or {}).items()}
        run_tags.update({HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())})
        commit = self._commit
        if commit and MLFLOW_GIT_COMMIT not in run_tags:
            run_tags[MLFLOW_GIT_COMMIT] = commit
        # With an explicit parent MLflow still refuses a second active run in this thread unless nested=True.
        nested = nested or parent_run_id is not None
        with mlflow.start_run(
            experiment_id=exp_id,
            run_name=run_name,
            nested=nested,
            parent_run_id=parent_run_id,
            tags=run_tags,
            description=description,
            log_system_metrics=False,
        ) as run:
            self._stack.append(run.info.run_id)
            try:
                yield run.info.run_id
            finally:
                self._stack.pop()

    def end_orphaned_runs(self, experiment_id: str) -> list[str]:
        """Mark KILLED the runs of `experiment_id` still RUNNING whose process, started on this host, is
        gone (killed before it could end its run). Runs of live processes and of other hosts are left
        alone. Returns the ids it ended."""
        host, ended = socket.gethostname(), []
        running = self.client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                          max_results=1000)
        for run in running:
            tags = run.data.tags
            pid = tags.get(PID_TAG, "")
            if tags.get(HOST_TAG) != host or not pid.isdigit() or _pid_alive(int(pid)):
                continue
            self.client.set_tag(run.info.run_id, "ended_by", f"a later run: process {pid} was gone")
            self.client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
        return ended

    # -- logging

    def log_params(self, params: dict) -> None:
        """Flattened (`a.b`), stringified, truncated to MAX_PARAM_CHARS, one batch (MLflow chunks it).

        MLflow params are write-once: logging a key again with a different value in the same run raises.
        """
        flat = flatten_params(params)
        if flat:
            self.client.log_batch(self._require_run(), params=[Param(k, v) for k, v in flat.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        run_id = self._require_run()
        now = int(time.time() * 1000)
        batch = [
            Metric(key=safe_key(k), value=float(v), timestamp=now, step=int(step)) for k, v in metrics.items()
        ]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def set_tags(self, tags: dict) -> None:
        run_id = self._require_run()
        if tags:
            self.client.log_batch(run_id, tags=[RunTag(safe_key(k), _stringify(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file, or a directory's contents, under `artifact_path`."""
        run_id = self._require_run()
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_model_dir(self, path: str | Path, name: str = "model") -> None:
        """Every file of a saved model directory, as artifacts under `name/` (fetched back by
        `registry.download_artifacts`)."""
        if not Path(path).is_dir():
            raise NotADirectoryError(path)
        self.log_artifact(path, artifact_path=name)

    def log_dict(self, obj: dict, name: str) -> None:
        """JSON artifact `name` (`.json` added when missing); non-JSON values (paths, numpy) via str()."""
        text = json.dumps(obj, indent=2, sort_keys=True, default=str)
        self.client.log_text(self._require_run(), text, _json_name(name))

    def log_figure(self, fig, name: str) -> None:
        """Matplotlib figure as a PNG artifact (`.png` added when missing); the figure stays open."""
        self.client.log_figure(self._require_run(), fig, _figure_name(name))

    def log_input(
        self, name: str, digest: str, counts: dict[str, int], source: str, *, context: str | None = None
    ) -> None:
        """Record a dataset input: its profile holds `counts`; a digest over 36 chars goes in full to a tag."""
        run_id = self._require_run()
        short = digest[:MAX_DATASET_DIGEST_SIZE]  # MLflow rejects longer digests
        dataset = _CountsDataset(_dataset_source(source), name=name, digest=short, counts=counts)
        tags = []
        if context:
            tags.append(InputTag(MLFLOW_DATASET_CONTEXT, context))
        if short != digest:
            tags.append(InputTag("digest", digest))
        # MetaDataset subclasses are turned into entities this way by mlflow.log_input itself.
        entity = dataset._to_mlflow_entity()
        self.client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=tags)])

    def log_pyfunc_model(
        self,
        python_model,
        name: str,
        artifacts: dict[str, str],
        input_example,
        registered_model_name: str | None = None,
    ) -> str:
        """Log a `mlflow.pyfunc.PythonModel` with its artifacts; returns the `models:/<model_id>` uri.

        `input_example` also infers the signature (MLflow runs `predict` on it while logging).
        """
        run_id = self._require_run()
        activate(self.tracking_uri)
        active = mlflow.active_run()
        if active is None or active.info.run_id != run_id:
            # pyfunc.log_model attaches to the fluent active run of this thread only.
            raise RuntimeError("log_pyfunc_model must be called in the thread that started the run")
        with quiet():
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=python_model,
                artifacts={k: str(v) for k, v in artifacts.items()},
                input_example=input_example,
                pip_requirements=pip_requirements(),
                registered_model_name=registered_model_name,
            )
        return info.model_uri


# --------------------------------------------------------------------------------------------------
# in memory


class NullTracker:
    """Tracker that keeps everything in dicts for unit tests; needs no active run.

    Params are flattened/truncated exactly like MLflowTracker; metrics keep (step, value) pairs.
    """

    def __init__(self) -> None:
        self.runs: list[dict[str, Any]] = []
        self.params: dict[str, str] = {}
        self.metrics: dict[str, list[tuple[int, float]]] = {}
        self.tags: dict[str, str] = {}
        self.artifacts: list[str] = []
        self.dicts: dict[str, dict] = {}
        self.inputs: list[dict[str, Any]] = []
        self.models: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._stack: list[str] = []

    @property
    def run_id(self) -> str | None:
        return self._stack[-1] if self._stack else None

    @contextmanager
    def start_run(
        self,
        experiment: str,
        run_name: str,
        *,
        tags: dict | None = None,
        description: str | None = None,
        nested: bool = False,
        parent_run_id: str | None = None,
    ) -> Iterator[str]:
        run_id = f"null-{next(self._ids)}"
        parent = parent_run_id or (self.run_id if nested else None)
        record = {
            "run_id": run_id,
            "experiment": experiment,
            "run_name": run_name,
            "parent_run_id": parent,
            "tags": {safe_key(k): _stringify(v) for k, v in (tags or {}).items()},
            "description": description,
            "status": "RUNNING",
        }
        self.runs.append(record)
        self._stack.append(run_id)
        try:
            yield run_id
            record["status"] = "FINISHED"
        except BaseException:
            record["status"] = "FAILED"
            raise
        finally:
            self._stack.pop()

    def log_params(self, params: dict) -> None:
        self.params.update(flatten_params(params))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(safe_key(key), []).append((int(step), float(value)))

    def set_tags(self, tags: dict) -> None:
        self.tags.update({safe_key(k): _stringify(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        prefix = f"{artifact_path}/" if artifact_path else ""
        if path.is_dir():  # like MLflow: the directory's contents, not the directory, go under artifact_path
            self.artifacts.extend(
                prefix + p.relative_to(path).as_posix() for p in sorted(path.rglob("*")) if p.is_file()
            )
        else:
            self.artifacts.append(prefix + path.name)

    def log_model_dir(self, path: str | Path, name: str = "model") -> None:
        if not Path(path).is_dir():
            raise NotADirectoryError(path)
        self.log_artifact(path, artifact_path=name)

    def log_dict(self, obj: dict, name: str) -> None:
        name = _json_name(name)
        self.dicts[name] = obj
        self.artifacts.append(name)

    def log_figure(self, fig, name: str) -> None:
        self.artifacts.append(_figure_name(name))

    def log_input(
        self, name: str, digest: str, counts: dict[str, int], source: str, *, context: str | None = None
    ) -> None:
        self.inputs.append(
            {"name": name, "digest": digest, "counts": dict(counts), "source": source, "context": context}
        )

    def log_pyfunc_model(
        self,
        python_model,
        name: str,
        artifacts: dict[str, str],
        input_example,
        registered_model_name: str | None = None,
    ) -> str:
        uri = f"null-models:/{name}/{len(self.models) + 1}"
        self.models.append(
            {
                "name": name,
                "python_model": python_model,
                "artifacts": dict(artifacts),
                "registered_model_name": registered_model_name,
                "uri": uri,
            }
        )
        return uri


# --------------------------------------------------------------------------------------------------
# finished runs, by id


def set_run_tags(run_id: str, tags: dict, tracking_uri: str) -> None:
    """Tag a finished (or running) run by id, e.g. with the Prefect flow-run id or a promotion decision."""
    client = mlflow_client(tracking_uri)
    for k, v in tags.items():
        client.set_tag(run_id, safe_key(k), _truncate(_stringify(v), 5000))


def run_metrics(run_id: str, tracking_uri: str) -> dict[str, float]:
    """Latest value of each metric of a run."""
    return dict(mlflow_client(tracking_uri).get_run(run_id).data.metrics)
