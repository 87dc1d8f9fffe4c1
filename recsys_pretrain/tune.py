"""The hyper-parameter search: Optuna's TPE sampler over a declared space of pretraining settings, each
trial one `pretrain` run, pruned on its per-epoch validation NDCG@10, within a total wall-clock budget.

    res = tune("data/prepared", load_config(None, ["tune.model=mf", "tune.minutes=30"]), "data/tune/mf")

Model selection reads validation only. `pretrain` evaluates every trial's model on the test split as it
always does; a trial's test metrics are kept out of its MLflow run and dropped, except the best trial's,
which the parent run reports (`best/test/...`) beside its model. So the test split is read once for the
model that was chosen, and never for choosing it.

MLflow: one parent run `tune-<model>-<dataset>` with a nested run per trial (tags `optuna.trial_number`,
`optuna.state` COMPLETE | PRUNED | FAIL; params `optuna.<key>` for the sampled values). A pruned trial's
run ends FAILED (the pruning exception leaves the run as any exception does) with `optuna.state=PRUNED`.
The parent logs the best value and params, the trials table (trials.csv), the optimisation history
(optimization_history.png), best.yaml, and the best trial's model directory and pyfunc model, so that the
parent run id works wherever a pretrain run id does (`evaluate RUN_ID`, serving).

Output directory: best.yaml (a config `load_config` reads: `recsys-pretrain --config best.yaml pretrain
--model M --data D` retrains the best trial), tune.json (the summary), trials.csv, and trials/<n>/ of the
best trial only (checkpoints/, model/); every other trial's directory is removed when it ends.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from recsys_pretrain.config import ConfigError, PretrainConfig, RunConfig, TuneConfig, from_dict
from recsys_pretrain.data.prepared import load_prepared
from recsys_pretrain.io import OutputError, check_output, file_lock, write_json, write_text
from recsys_pretrain.models import MODELS, model_class
from recsys_pretrain.pyfunc import log_recommender
from recsys_pretrain.tracking import NullTracker, redact_uri
from recsys_pretrain.train.pretrain import pretrain

log = logging.getLogger(__name__)

MONITOR = "val_ndcg_at_10"  # the history row's key the trials are pruned and chosen on
TRIALS_MARKER = ".recsys-tune"  # in trials/: this directory is tune's, and the next tune may replace it

_SPEC_KEYS = {
    "categorical": {"type", "choices"},
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
}


# ---- the search space ----------------------------------------------------------------------------------
def default_space(base: PretrainConfig, model: str) -> dict[str, dict[str, Any]]:
    """The model's own default space (its `search_space`), keyed under its config section."""
    space = model_class(model).search_space(base.model_config(model))
    return {f"{model}.{k}": v for k, v in space.items()}


def _flat_space(space: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """`{"mf": {"dim": spec}}` and `{"mf.dim": spec}` alike -> `{"mf.dim": spec}`: a spec has a `type`."""
    out: dict[str, dict[str, Any]] = {}
    for k, v in space.items():
        key = f"{prefix}{k}"
        if not isinstance(v, dict):
            raise ConfigError(f"tune.space.{key}: expected a distribution mapping like {{type: float, low: 1e-4, "
                              f"high: 1e-2, log: true}}, got {v!r}")
        if "type" in v:
            out[key] = v
        else:
            out.update(_flat_space(v, f"{key}."))
    return out


def _nested(params: dict[str, Any]) -> dict[str, Any]:
    """`{"mf.train.lr": 0.01}` -> `{"mf": {"train": {"lr": 0.01}}}`."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def with_params(base: PretrainConfig, params: dict[str, Any]) -> PretrainConfig:
    """`base` with dotted keys set, through the loader's own checks (unknown keys and bad types fail)."""
    return from_dict(PretrainConfig, _nested(params), prefix="pretrain.", base=base)


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check_spec(key: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A declared distribution, checked and normalised."""
    kind = spec.get("type")
    where = f"tune.space.{key}"
    if kind not in _SPEC_KEYS:
        raise ConfigError(f"{where}: type {kind!r}; use categorical, float or int")
    extra = sorted(set(spec) - _SPEC_KEYS[kind])
    if extra:
        raise ConfigError(f"{where}: unknown field(s) {extra} for type {kind}; valid: {sorted(_SPEC_KEYS[kind])}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: categorical needs a non-empty list of choices, got {choices!r}")
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise ConfigError(f"{where}: a choice must be a number, text, true/false or null, got {c!r}")
        return {"type": kind, "choices": list(choices)}
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: {kind} needs low and high")
    num = int if kind == "int" else float
    try:
        low, high = num(spec["low"]), num(spec["high"])
        step = None if spec.get("step") is None else num(spec["step"])
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: low, high and step must be numbers ({kind}), got {spec!r}") from None
    log_scale = spec.get("log", False)
    if not isinstance(log_scale, bool):
        raise ConfigError(f"{where}: log must be true or false, got {log_scale!r}")
    if not low <= high:
        raise ConfigError(f"{where}: low {low} is above high {high}")
    if log_scale and low <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0, got {low}")
    if log_scale and step is not None:
        raise ConfigError(f"{where}: step and log cannot be combined")
    if step is not None and step <= 0:
        raise ConfigError(f"{where}: step must be positive, got {step}")
    return {"type": kind, "low": low, "high": high, "log": log_scale, "step": step}


def _is_int_setting(base, key: str) -> bool:
    """Whether the config field at dotted `key` is declared an integer (`int`, or `int | None` for a setting
    derived from the data when unset), read off the dataclass annotation rather than the current value."""
    *path, name = key.split(".")
    obj = base
    for part in path:
        obj = getattr(obj, part)
    ann = str(next(f.type for f in dataclasses.fields(obj) if f.name == name))
    kinds = {t.strip() for t in ann.split("|")} - {"None"}
    return kinds == {"int"}


def resolve_space(cfg: TuneConfig, base: PretrainConfig) -> dict[str, dict[str, Any]]:
    """The checked space: every key a real setting of `cfg.model` that every value of its distribution
    may take (through the same conversion as the config loader), so that a typo fails before any trial."""
    declared = _flat_space(cfg.space) if cfg.space else default_space(base, cfg.model)
    if not declared:
        raise ConfigError("tune.space: empty")
    out = {}
    for key, spec in declared.items():
        if not key.startswith(f"{cfg.model}."):
            raise ConfigError(f"tune.space.{key}: not a setting of the tuned model {cfg.model!r} (keys are "
                              f"dotted paths of the pretrain section, e.g. {cfg.model}.train.lr)")
        if key.endswith(".train.max_minutes"):
            raise ConfigError(f"tune.space.{key}: the trial's time is tune.trial_max_minutes, not a search dimension")
        spec = _check_spec(key, spec)
        values = spec["choices"] if spec["type"] == "categorical" else [spec["low"], spec["high"]]
        for v in values:
            try:
                checked = with_params(base, {key: v})
            except ConfigError as exc:
                raise ConfigError(f"tune.space.{key}: {exc}") from None
            current = _get(checked, key)
            if dataclasses.is_dataclass(current):
                raise ConfigError(f"tune.space.{key}: a section, not a setting")
        if spec["type"] == "float" and _is_int_setting(base, key):
            raise ConfigError(f"tune.space.{key}: an integer setting; declare type int or categorical")
        out[key] = spec
    return out


def suggest(trial: optuna.Trial, key: str, spec: dict[str, Any]) -> Any:
    if spec["type"] == "categorical":
        return trial.suggest_categorical(key, spec["choices"])
    if spec["type"] == "int":
        return trial.suggest_int(key, spec["low"], spec["high"], step=spec["step"] or 1, log=spec["log"])
    return trial.suggest_float(key, spec["low"], spec["high"], step=spec["step"], log=spec["log"])


def check_tune_config(cfg: TuneConfig) -> float:
    """Raise ConfigError on an unusable TuneConfig; return the per-trial cap in minutes."""
    if cfg.model not in MODELS:
        raise ConfigError(f"tune.model: {cfg.model!r}; known: {sorted(MODELS)}")
    if not cfg.minutes > 0:
        raise ConfigError(f"tune.minutes must be positive, got {cfg.minutes}")
    cap = cfg.trial_max_minutes if cfg.trial_max_minutes is not None else cfg.minutes / 4
    if not 0 < cap <= cfg.minutes:
        raise ConfigError(f"tune.trial_max_minutes {cap} must be positive and at most tune.minutes {cfg.minutes}")
    if cfg.n_trials is not None and cfg.n_trials < 1:
        raise ConfigError(f"tune.n_trials must be at least 1 (or null), got {cfg.n_trials}")
    if cfg.pruner not in ("median", "none"):
        raise ConfigError(f"tune.pruner: {cfg.pruner!r}; use median or none")
    if cfg.sampler_startup_trials < 0 or cfg.pruner_startup_trials < 0 or cfg.pruner_warmup_steps < 0:
        raise ConfigError("tune: sampler_startup_trials, pruner_startup_trials and pruner_warmup_steps are >= 0")
    return cap


# ---- a trial's tracking ----------------------------------------------------------------------------------
class TrialTracker:
    """What a trial's `pretrain` run writes through: the run gets its trial's tags and sampled params, and
    is kept clear of what only the chosen model carries: test metrics, the exported model directory, the
    pyfunc model and the checkpoint (the parent logs the best trial's). Everything else is passed on."""

    @staticmethod
    def _is_test(key: str) -> bool:  # test/..., test_no_refit/..., popularity_test
        return key.split("/", 1)[0].startswith(("test", "popularity_test"))

    def __init__(self, inner, tags: dict[str, Any], params: dict[str, Any]):
        self.inner, self.tags, self.params = inner, tags, params
        self.started: str | None = None  # the trial's run id, once started

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    @property
    def run_id(self) -> str | None:
        return self.inner.run_id

    @contextmanager
    def start_run(self, experiment: str, run_name: str, *, tags: dict | None = None,
                  description: str | None = None, nested: bool = False,
                  parent_run_id: str | None = None) -> Iterator[str]:
        with self.inner.start_run(experiment, run_name, tags={**(tags or {}), **self.tags}, description=description,
                                  nested=nested, parent_run_id=parent_run_id) as run_id:
            self.started = run_id
            self.inner.log_params(self.params)
            state = "FAIL"
            try:
                yield run_id
                state = "COMPLETE"
            except optuna.TrialPruned:
                state = "PRUNED"
                raise
            finally:
                self.inner.set_tags({"optuna.state": state})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        kept = {k: v for k, v in metrics.items() if not self._is_test(k)}
        if kept:
            self.inner.log_metrics(kept, step=step)

    def log_dict(self, obj: dict, name: str) -> None:
        self.inner.log_dict({k: v for k, v in obj.items() if not self._is_test(k)}, name)

    def log_model_dir(self, path: str | Path, name: str = "model") -> None:
        return None

    def log_pyfunc_model(self, python_model, name: str, artifacts: dict[str, str], input_example,
                         registered_model_name: str | None = None) -> None:
        return None

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if artifact_path != "checkpoints":
            self.inner.log_artifact(path, artifact_path)


# ---- the study -----------------------------------------------------------------------------------------------
@dataclass
class TrialRecord:
    number: int
    state: str  # COMPLETE | PRUNED | FAIL
    value: float | None  # validation NDCG@10 of the trial's best epoch; a pruned trial's best reported one
    params: dict[str, Any]
    run_id: str | None
    seconds: float
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, validation NDCG@10)


@dataclass
class TuneResult:
    parent_run_id: str | None
    best_trial: int
    best_value: float
    best_params: dict[str, Any]
    best_run_id: str | None
    best_yaml: Path
    best_model_dir: Path
    valid: dict[str, float]  # the best trial's model on validation
    test: dict[str, float]  # ... and on test: the only test metrics the search reports
    trials: list[TrialRecord]
    stopped: str  # n_trials | budget
    seconds: float
    out_dir: Path

    def summary(self) -> dict[str, Any]:
        states = [t.state for t in self.trials]
        return {"best_value": self.best_value, "best_params": self.best_params, "best_trial": self.best_trial,
                "best_yaml": str(self.best_yaml), "best_model_dir": str(self.best_model_dir),
                "best_run_id": self.best_run_id, "parent_run_id": self.parent_run_id,
                "trials": {"run": len(states), "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
                           "failed": states.count("FAIL")},
                "stopped": self.stopped, "seconds": round(self.seconds, 1), "valid": self.valid, "test": self.test}


def _prepare_trials_dir(trials_dir: Path) -> None:
    """A fresh trials/ directory; one a previous tune left (its marker inside) is replaced."""
    if trials_dir.exists() or trials_dir.is_symlink():
        if not (trials_dir / TRIALS_MARKER).exists():
            raise OutputError(f"{trials_dir}: exists and was not written by `recsys-pretrain tune`; choose another "
                              "--out")
        shutil.rmtree(trials_dir)
    trials_dir.mkdir(parents=True)
    (trials_dir / TRIALS_MARKER).write_text("trial directories of recsys-pretrain tune; replaced by the next one\n")


def _plain(obj: Any) -> Any:
    """Tuples to lists, for yaml.safe_dump."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def best_config_yaml(cfg: RunConfig, best: PretrainConfig, header: str) -> str:
    """The YAML `load_config` reads to retrain the best trial: the whole pretrain section (so it does not
    depend on the code's defaults), the search that chose it, and the run's name and data_dir. Only these
    sections: the others hold nothing the model needs (and serve holds a secret)."""
    pre = dataclasses.asdict(best)
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    if pre["tracking_uri"] and redact_uri(pre["tracking_uri"]) != pre["tracking_uri"]:
        pre["tracking_uri"] = None  # never written to a file that is logged as an artifact
        lines.append("# pretrain.tracking_uri left out: it carries credentials (use $MLFLOW_TRACKING_URI)")
    body = {"name": cfg.name, "data_dir": cfg.data_dir, "pretrain": pre, "tune": dataclasses.asdict(cfg.tune)}
    return "\n".join(lines) + "\n" + yaml.safe_dump(_plain(body), sort_keys=False)


def history_figure(trials: list[TrialRecord], title: str):
    """Left: each trial's validation NDCG@10 by epoch (pruned dotted). Right: each trial's value and the
    best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    best_n = max((t for t in trials if t.state == "COMPLETE"), key=lambda t: t.value, default=None)
    for t in trials:
        if not t.curve:
            continue
        ep, v = zip(*t.curve, strict=True)
        style = {"color": "tab:orange", "lw": 2, "zorder": 3} if t is best_n else {"color": "0.6", "lw": 1}
        ax1.plot(ep, v, ls=":" if t.state == "PRUNED" else "-", marker=".", **style)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("validation NDCG@10")
    ax1.set_title("trials by epoch (pruned dotted, best orange)")
    done = [t for t in trials if t.value is not None]
    for state, marker, color in (("COMPLETE", "o", "tab:blue"), ("PRUNED", "x", "tab:red")):
        pts = [(t.number, t.value) for t in done if t.state == state]
        if pts:
            ax2.scatter(*zip(*pts, strict=True), marker=marker, color=color, label=state.lower())
    run_best, best_line = -math.inf, []
    for t in sorted(done, key=lambda t: t.number):
        if t.state == "COMPLETE":
            run_best = max(run_best, t.value)
        if run_best > -math.inf:
            best_line.append((t.number, run_best))
    if best_line:
        ax2.step(*zip(*best_line, strict=True), where="post", color="tab:orange", label="best so far")
    ax2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax2.set_xlabel("trial")
    ax2.set_ylabel("validation NDCG@10")
    ax2.set_title(title)
    ax2.legend(loc="lower right")
    fig.tight_layout()
    return fig


def tune(prepared: str | Path, cfg: RunConfig, out_dir: str | Path, tracker=None) -> TuneResult:
    """Search `cfg.tune.space` for `cfg.tune.model` on a prepared dataset, each trial `pretrain` with
    `cfg.pretrain` as the base config; write `out_dir/{best.yaml,tune.json,trials.csv}` and keep the best
    trial's model in `out_dir/trials/<n>/model`. Tracking as the module docstring says."""
    t_start = time.perf_counter()
    tracker = tracker or NullTracker()
    tcfg = cfg.tune
    cap_min = check_tune_config(tcfg)
    base = dataclasses.replace(cfg.pretrain, model=tcfg.model)
    space = resolve_space(tcfg, base)
    data = load_prepared(prepared)  # also: fails early on a directory that is not prepared data
    dataset, n_users, n_items = data.name, data.n_users, data.n_items
    del data
    out = Path(out_dir)
    check_output(out, inputs=[prepared], force=True)  # never inside the input; the directory is ours to fill
    out.mkdir(parents=True, exist_ok=True)
    budget_s, cap_s = tcfg.minutes * 60, cap_min * 60
    experiment = base.experiment or dataset
    study_name = f"tune-{tcfg.model}-{dataset}"

    with file_lock(out / ".tune.lock", timeout_s=0):
        trials_dir = out / "trials"
        _prepare_trials_dir(trials_dir)
        sampler = optuna.samplers.TPESampler(seed=tcfg.seed, n_startup_trials=tcfg.sampler_startup_trials)
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=tcfg.pruner_startup_trials,
                                              n_warmup_steps=tcfg.pruner_warmup_steps)
                  if tcfg.pruner == "median" else optuna.pruners.NopPruner())
        study = optuna.create_study(study_name=study_name, direction="maximize", sampler=sampler, pruner=pruner)
        records: dict[int, TrialRecord] = {}
        best: dict[str, Any] = {}  # the best complete trial so far: its number, value, metrics, dir, config
        overhead = {"s": 0.0}  # the longest time a trial took beyond its training loop (load, evaluate, export)
        deadline = time.perf_counter() + budget_s

        with tracker.start_run(experiment, study_name,
                               tags={"model_type": tcfg.model, "dataset": dataset, "stage": "tune",
                                     "optuna.study": study_name},
                               description=f"Optuna TPE search over {tcfg.model} pretraining on {dataset}: "
                                           "nested runs are trials, chosen on validation NDCG@10") as parent_id:
            tracker.log_params({"tune": {**{k: v for k, v in dataclasses.asdict(tcfg).items() if k != "space"},
                                         "trial_max_minutes": cap_min},
                                "data": {"users": n_users, "items": n_items}})
            tracker.log_dict({"space": space, "base": dataclasses.asdict(base)}, "tune_space.json")

            def objective(trial: optuna.Trial) -> float:
                params = {key: suggest(trial, key, spec) for key, spec in space.items()}
                pcfg = with_params(base, {**params, f"{tcfg.model}.train.max_minutes": cap_min})
                pcfg = dataclasses.replace(pcfg, resume="never")  # a trial never continues another's checkpoint
                trial_dir = trials_dir / f"{trial.number:03d}"
                rec = records[trial.number] = TrialRecord(trial.number, "FAIL", None, params, None, 0.0)
                trained = {"s": 0.0}

                def on_epoch(epoch: int, row: dict) -> None:
                    trained["s"] = row.get("elapsed_s", trained["s"])
                    if MONITOR not in row:
                        return
                    value = float(row[MONITOR])
                    rec.curve.append((epoch, value))
                    rec.value = max(value, rec.value if rec.value is not None else -math.inf)
                    trial.report(value, epoch)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"epoch {epoch}: validation NDCG@10 {value:.4f} below the "
                                                 "median of earlier trials at this epoch")

                trial_tracker = TrialTracker(tracker, tags={"optuna.trial_number": trial.number,
                                                            "optuna.study": study_name},
                                             params={"optuna": {"trial_number": trial.number, **params}})
                t0, done = time.perf_counter(), False
                try:
                    res = pretrain(prepared, pcfg, trial_dir, tracker=trial_tracker,
                                   run_name=f"trial-{trial.number:03d}", parent_run_id=parent_id, on_epoch=on_epoch)
                    done = True
                except optuna.TrialPruned:
                    rec.state = "PRUNED"
                    raise
                finally:
                    rec.seconds = time.perf_counter() - t0
                    rec.run_id = trial_tracker.started
                    overhead["s"] = max(overhead["s"], rec.seconds - trained["s"])
                    trial.set_user_attr("run_id", rec.run_id)
                    if not done:  # pruned or failed: nothing of it is kept
                        shutil.rmtree(trial_dir, ignore_errors=True)
                value = float(res.valid["ndcg_at_10"])
                rec.state, rec.value = "COMPLETE", value
                trial.set_user_attr("best_epoch", res.fit.best_epoch)
                trial.set_user_attr("epochs", res.fit.epochs_run)
                trial.set_user_attr("stopped", res.fit.stopped)
                if not best or value > best["value"]:
                    if best:
                        shutil.rmtree(best["dir"], ignore_errors=True)
                    # test metrics of this model are kept only while it is the best; they are reported once
                    best.update(number=trial.number, value=value, valid=res.valid, test=res.test, dir=trial_dir,
                                model_dir=res.model_dir, run_id=rec.run_id,
                                config=dataclasses.replace(pcfg, resume=base.resume))
                else:
                    shutil.rmtree(trial_dir, ignore_errors=True)
                return value

            def after_trial(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
                rec = records.get(frozen.number)
                if rec is not None:
                    tracker.log_metrics({"trial/val_ndcg_at_10": rec.value if rec.value is not None else float("nan"),
                                         "trial/pruned": float(rec.state == "PRUNED"), "trial/seconds": rec.seconds},
                                        step=frozen.number)
                # A trial may take its cap plus the longest load/evaluation/export seen so far: start none
                # that could not end within the budget.
                if deadline - time.perf_counter() < cap_s + overhead["s"]:
                    study.stop()

            # timeout: the last moment a trial may start (its cap still fits); the first one always starts.
            study.optimize(objective, n_trials=tcfg.n_trials, timeout=max(budget_s - cap_s, 1.0),
                           callbacks=[after_trial], catch=())
            trials = [records[t.number] for t in study.trials if t.number in records]
            if not best:
                raise RuntimeError(f"tune: none of {len(trials)} trial(s) completed within the budget")
            if best["number"] != study.best_trial.number:  # both keep the first of equal values
                raise AssertionError(f"best trial {best['number']} != Optuna's {study.best_trial.number}")
            stopped = "n_trials" if tcfg.n_trials is not None and len(trials) >= tcfg.n_trials else "budget"
            best_params = records[best["number"]].params

            header = (f"Written by `recsys-pretrain tune`: study {study_name}, best of {len(trials)} trials: "
                      f"trial {best['number']},\nvalidation NDCG@10 {best['value']:.4f} (MLflow run "
                      f"{best['run_id']}). Retrain it:\n  recsys-pretrain --config best.yaml pretrain --model "
                      f"{tcfg.model} --data {prepared}\n{tcfg.model}.train.max_minutes is the trial's cap "
                      f"({cap_min:g}); raise or clear it to train longer.")
            best_yaml = write_text(out / "best.yaml", best_config_yaml(cfg, best["config"], header))
            table = study.trials_dataframe(attrs=("number", "value", "state", "duration", "params", "user_attrs"))
            table.to_csv(out / "trials.csv", index=False)

            tracker.log_params({"best": best_params})
            tracker.log_metrics({"best/val_ndcg_at_10": best["value"],
                                 **{f"best/valid/{k}": v for k, v in best["valid"].items()},
                                 **{f"best/test/{k}": v for k, v in best["test"].items()},
                                 "trials/run": len(trials),
                                 "trials/complete": sum(t.state == "COMPLETE" for t in trials),
                                 "trials/pruned": sum(t.state == "PRUNED" for t in trials),
                                 "tune/seconds": time.perf_counter() - t_start}, step=len(trials))
            tracker.set_tags({"best_trial": best["number"], "best_trial_run_id": best["run_id"] or "",
                              "stopped": stopped})
            tracker.log_artifact(out / "trials.csv")
            tracker.log_artifact(best_yaml)
            fig = history_figure(trials, f"{study_name}: value by trial")
            tracker.log_figure(fig, "optimization_history.png")
            import matplotlib.pyplot as plt

            plt.close(fig)
            tracker.log_model_dir(best["model_dir"], name="model_dir")  # what `evaluate RUN_ID` fetches
            log_recommender(tracker, best["model_dir"], name="model")

    result = TuneResult(parent_run_id=parent_id, best_trial=best["number"], best_value=best["value"],
                        best_params=best_params, best_run_id=best["run_id"], best_yaml=best_yaml,
                        best_model_dir=Path(best["model_dir"]), valid=best["valid"], test=best["test"],
                        trials=trials, stopped=stopped, seconds=time.perf_counter() - t_start, out_dir=out)
    write_json(out / "tune.json", {**result.summary(),
                                   "trials_detail": [dataclasses.asdict(t) for t in trials]})
    log.info("tune: %s", json.dumps(result.summary(), default=str))
    return result
