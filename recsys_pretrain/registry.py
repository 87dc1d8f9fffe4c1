"""The model registry, and the one place that turns what a user passes as a model into a local directory.

    resolve_model_dir(source, tracking_uri, cache_dir)   a model directory, a run id, runs:/RUN_ID[/...],
                                                         models:/NAME@ALIAS or models:/NAME/VERSION -> a local
                                                         model directory (fetched from MLflow, cached per run)
    register_model / set_alias / get_alias_version       versions and aliases (the champion/challenger gate)
    get_model_version, champion_trained_at               what a version or a run is
    load_pyfunc / download_artifacts                     a logged pyfunc model, a run's artifacts, fetched back

MLflow (and `recsys_pretrain.tracking`, which imports it) is imported inside the functions that talk to a
store ("mlflow, on first use"): resolving a local model directory, as every serving start does, never loads
it (a second or more of import time, and a dependency a local model does not need).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from recsys_pretrain.io import _UMASK

__all__ = [
    "CACHE_COMPLETE",
    "CACHE_TMP_PREFIX",
    "champion_trained_at",
    "download_artifacts",
    "get_alias_version",
    "get_model_version",
    "load_pyfunc",
    "parse_models_uri",
    "register_model",
    "resolve_model_dir",
    "set_alias",
]

MODEL_ARTIFACT = "model_dir"  # the artifact a pretraining run logs its model directory under
CACHE_COMPLETE = ".complete"  # written last into a cache entry, before it is moved into place
CACHE_TMP_PREFIX = ".tmp-"  # downloads in progress (or cut off), beside the entries of a cache directory
_STALE_TMP_S = 24 * 3600
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


# ---- model sources ------------------------------------------------------------------------------------------
def parse_models_uri(uri: str) -> tuple[str, str | None, str | None] | None:
    """(name, alias, version), one of the last two None, of `models:/NAME@ALIAS` or `models:/NAME/VERSION`;
    None for anything else (a logged-model id `models:/m-...`, a run, a path)."""
    if not uri.startswith("models:/"):
        return None
    rest = uri[len("models:/"):]
    name, sep, alias = rest.partition("@")
    if sep:
        return (name, alias, None) if name and alias else None
    name, sep, version = rest.rpartition("/")
    if not sep or not name or not version.isdigit():
        return None
    return name, None, version


def resolve_model_dir(source: str | Path, tracking_uri: str | None = None,
                      cache_dir: str | Path | None = None) -> Path:
    """A local model directory for `source`: a directory; an MLflow run id or `runs:/RUN_ID[/...]`; a
    registered model `models:/NAME@ALIAS` or `models:/NAME/VERSION` (the version's run). From MLflow, the
    run's `model_dir` artifact is fetched: once per run into `cache_dir` (see `_cached_download`), else into
    a fresh temp directory."""
    text = str(source)
    if Path(text).is_dir():
        return Path(text)
    run_id = None
    if text.startswith("models:/"):
        parsed = parse_models_uri(text)
        if parsed is None:
            raise ValueError(f"model source {text!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        name, alias, version = parsed
        if alias is not None:
            found = get_alias_version(name, alias, _uri(tracking_uri, text))
            if found is None:
                raise FileNotFoundError(f"model source {text!r}: no registered model {name!r} with alias {alias!r}")
        else:
            found = get_model_version(name, int(version), _uri(tracking_uri, text))
            if found is None:
                raise FileNotFoundError(f"model source {text!r}: no registered model {name!r} version {version}")
        if not found.get("run_id"):
            raise ValueError(f"model source {text!r}: version {found['version']} has no run to fetch from")
        run_id = found["run_id"]
    elif text.startswith("runs:/"):
        run_id = text[len("runs:/"):].split("/", 1)[0]
    elif _RUN_ID.match(text):
        run_id = text
    if run_id is None:
        raise FileNotFoundError(f"model source {text!r}: not a directory, an MLflow run id, runs:/RUN_ID, "
                                "models:/NAME@ALIAS or models:/NAME/VERSION")
    uri = _uri(tracking_uri, text)
    if cache_dir is None:
        return download_artifacts(run_id, MODEL_ARTIFACT, uri)
    # `download_artifacts` is looked up when called, so a test can stand in for the store
    return _cached_download(Path(cache_dir), run_id,
                            lambda dst: download_artifacts(run_id, MODEL_ARTIFACT, uri, dst_path=dst))


def _uri(tracking_uri: str | None, what: str) -> str:
    if not tracking_uri:
        raise ValueError(f"model source {what!r} is an MLflow reference: a tracking_uri is needed")
    return tracking_uri


def _cached_download(cache: Path, run_id: str, download: Callable[[Path], Path]) -> Path:
    """`cache/<run_id>/model_dir`, downloaded once: into `cache/.tmp-<random>`, marked complete, then moved
    to its name with one rename, so an entry is there whole or not at all (a download cut off by a crash or
    a full disk leaves only a .tmp- directory, removed by a later call once it is a day old). Artifacts of
    a finished run never change: a complete entry is reused as it is. An entry without the mark (written by
    an older version, which downloaded in place) is set aside and fetched again."""
    final = cache / run_id
    if (final / CACHE_COMPLETE).exists():
        return final / MODEL_ARTIFACT
    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(cache)
    if final.exists():  # incomplete: moved aside first (one rename), then removed
        aside = Path(tempfile.mkdtemp(prefix=CACHE_TMP_PREFIX, dir=cache))
        try:
            os.replace(final, aside / run_id)
        except OSError:
            pass  # another process moved it first
        shutil.rmtree(aside, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=CACHE_TMP_PREFIX, dir=cache))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; the entry is an ordinary directory
        local = Path(download(tmp))
        if local.resolve() != (tmp / MODEL_ARTIFACT).resolve():
            raise RuntimeError(f"model download landed in {local}, not in {tmp / MODEL_ARTIFACT}")
        (tmp / CACHE_COMPLETE).touch()
        try:
            os.replace(tmp, final)
        except OSError:  # another process put it in place meanwhile: theirs is as good
            if not (final / CACHE_COMPLETE).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when it was moved into place
    return final / MODEL_ARTIFACT


def _remove_stale_tmp(cache: Path) -> None:
    """Downloads a crash cut off, left a day ago or more (a recent one may still be running elsewhere)."""
    now = time.time()
    for entry in cache.glob(f"{CACHE_TMP_PREFIX}*"):
        try:
            if now - entry.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


# ---- the registry (champion/challenger gate) ----------------------------------------------------------------
def register_model(model_uri: str, name: str, tracking_uri: str, reuse: bool = False) -> int:
    """New version of registered model `name` (created when missing) from `model_uri`; returns the version.
    `reuse`: a model URI already registered under `name` returns that version (a retried task registers once)."""
    from recsys_pretrain.tracking import activate, already_exists, mlflow_client  # mlflow, on first use

    activate(tracking_uri)  # MLflow resolves a models:/ source through the process-wide store
    client = mlflow_client(tracking_uri)
    try:
        client.create_registered_model(name)
    except Exception as exc:
        if not already_exists(exc):
            raise
    same = [v for v in client.search_model_versions(f"name = '{name}'") if v.source == model_uri] if reuse else []
    if same:
        return min(int(v.version) for v in same)
    run_id = model_id = None
    if model_uri.startswith("models:/"):
        rest = model_uri[len("models:/") :]
        if rest and "/" not in rest and "@" not in rest:  # models:/<model_id>, as log_model returns
            model_id = rest
            run_id = client.get_logged_model(model_id).source_run_id
    elif model_uri.startswith("runs:/"):
        run_id = model_uri[len("runs:/") :].split("/", 1)[0]
    version = client.create_model_version(name=name, source=model_uri, run_id=run_id, model_id=model_id)
    return int(version.version)


def set_alias(name: str, alias: str, version: int, tracking_uri: str) -> None:
    """Point `name@alias` at `version` (moves the alias if it was elsewhere)."""
    from recsys_pretrain.tracking import mlflow_client  # mlflow, on first use

    mlflow_client(tracking_uri).set_registered_model_alias(name, alias, str(version))


def get_alias_version(name: str, alias: str, tracking_uri: str) -> dict | None:
    """{"version", "run_id", "source"} behind `name@alias`; None when the model or the alias is absent."""
    from recsys_pretrain.tracking import does_not_exist, mlflow_client  # mlflow, on first use

    client = mlflow_client(tracking_uri)
    try:
        model = client.get_registered_model(name)
    except Exception as exc:
        if does_not_exist(exc):
            return None
        raise
    # Read the alias map instead of get_model_version_by_alias: a missing alias there is an
    # INVALID_PARAMETER_VALUE error, indistinguishable from a malformed request.
    version = (model.aliases or {}).get(alias)
    if version is None:
        return None
    mv = client.get_model_version(name, str(version))
    return {"version": int(mv.version), "run_id": mv.run_id, "source": mv.source}


def get_model_version(name: str, version: int, tracking_uri: str) -> dict | None:
    """{"version", "run_id", "source"} of `name` version `version`; None when the model or version is absent."""
    from recsys_pretrain.tracking import does_not_exist, mlflow_client  # mlflow, on first use

    try:
        mv = mlflow_client(tracking_uri).get_model_version(name, str(int(version)))
    except Exception as exc:
        if does_not_exist(exc):
            return None
        raise
    return {"version": int(mv.version), "run_id": mv.run_id, "source": mv.source}


def champion_trained_at(run_id: str, tracking_uri: str) -> datetime:
    """When the run started (an aware UTC datetime): what a model trained in it may have learnt from."""
    from recsys_pretrain.tracking import mlflow_client  # mlflow, on first use

    return datetime.fromtimestamp(mlflow_client(tracking_uri).get_run(run_id).info.start_time / 1000, tz=UTC)


# ---- fetching models back -------------------------------------------------------------------------------------
def load_pyfunc(model_uri: str, tracking_uri: str, dst_path: str | Path | None = None):
    """`mlflow.pyfunc.load_model` against `tracking_uri` (models:/name@alias, models:/<id>, runs:/...).
    The model is downloaded into `dst_path` (created if missing; the caller removes it when done), else
    into a fresh temp directory that MLflow never removes."""
    import mlflow.pyfunc  # mlflow, on first use

    from recsys_pretrain.tracking import activate, quiet

    activate(tracking_uri)  # models:/ resolution only reads the global registry URI
    if dst_path is not None:
        Path(dst_path).mkdir(parents=True, exist_ok=True)
    with quiet():
        return mlflow.pyfunc.load_model(model_uri, dst_path=None if dst_path is None else str(dst_path))


def download_artifacts(
    run_id: str, artifact_path: str, tracking_uri: str, dst_path: str | Path | None = None
) -> Path:
    """Local copy of a run's artifact file or directory (into a fresh temp dir unless `dst_path`)."""
    import mlflow.artifacts  # mlflow, on first use

    if dst_path is not None:
        Path(dst_path).mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id,
        artifact_path=artifact_path,
        dst_path=None if dst_path is None else str(dst_path),
        tracking_uri=tracking_uri,
    )
    return Path(local)
