"""The steps of the nightly pipeline as plain library functions (no orchestration here).

`flows/nightly.py` wires them into a Prefect flow; each function takes paths and configs and returns
paths, run ids and metrics, so a step can also run by hand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import polars as pl
import yaml

from recsys_pretrain.checkpoint import item_overlap, load_model_dir
from recsys_pretrain.config import RunConfig, ServeConfig
from recsys_pretrain.data import partitions as P
from recsys_pretrain.data.forget import forget_pending
from recsys_pretrain.data.ingest import ingest
from recsys_pretrain.data.labels import build_labels
from recsys_pretrain.data.prepare import prepare
from recsys_pretrain.data.prepared import load_prepared
from recsys_pretrain.data.synthetic import write_synthetic
from recsys_pretrain.distributed import torchrun_command
from recsys_pretrain.evaluation import evaluate
from recsys_pretrain.gates import GateResult, promotion_gate, quality_gate
from recsys_pretrain.index import build_model_index
from recsys_pretrain.io import file_lock, sha256_file, write_json, write_text
from recsys_pretrain.models import model_class, resolve
from recsys_pretrain.registry import (
    champion_trained_at,
    get_alias_version,
    register_model,
    resolve_model_dir,
    set_alias,
)
from recsys_pretrain.serve import load_recommender
from recsys_pretrain.tracking import MLflowTracker, redact_uri, run_metrics, set_run_tags
from recsys_pretrain.train.finetune import finetune, pretrain_before_cutoff
from recsys_pretrain.train.pretrain import pretrain
from recsys_pretrain.vocab import Vocab


def content_hash(paths: list[str | Path]) -> str:
    """sha256 over the bytes of every input file, in order: the identity of a night's log."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(Path(p).name).encode())
        sha256_file(p, into=h)
    return h.hexdigest()


def root(cfg: RunConfig) -> Path:
    return Path(cfg.data_dir).resolve() / cfg.name


def synthesize_log(cfg: RunConfig) -> list[str]:
    """The embedded default input: a generated log (skipped when already there for this config)."""
    raw = root(cfg) / "raw" / f"events-seed{cfg.synth.seed}.csv"
    if not raw.exists():
        write_synthetic(cfg.synth, raw, truth=raw.with_suffix(".truth.npz"))
    return [str(raw)]


def ingest_step(inputs: list[str], cfg: RunConfig) -> str:
    out = root(cfg) / "ingested" / content_hash(inputs)[:16]
    ingest(inputs, out, cfg.ingest)
    return str(out)


# ---- partitioned, incremental ingest (flow.partitioned) ----------------------------------------------------
def partition_store(cfg: RunConfig) -> Path:
    return root(cfg) / "partitions"


def daily_inputs(inputs: list[str], cfg: RunConfig) -> list[str]:
    """Inputs as days: files that name their day are kept; the generated log (no day in its name) is split
    into one file a day under raw/daily (once)."""
    out = []
    for p in inputs:
        try:
            P.day_of(p)
            out.append(p)
        except P.IngestError:
            daily = root(cfg) / "raw" / "daily" / Path(p).stem
            done = daily / "DONE.json"
            if not done.exists():
                write_json(done, {"files": P.split_by_day(p, daily), "source": str(p)})
            out += json.loads(done.read_text())["files"]
    return out


def plan_partitions_step(inputs: list[str], cfg: RunConfig) -> dict[str, list[str]]:
    """The days among tonight's inputs not ingested as they are now (new or changed): {day: files}."""
    P.open_store(partition_store(cfg), inputs)
    return P.plan(inputs, partition_store(cfg), cfg.ingest)


def ingest_partition_step(day: str, files: list[str], cfg: RunConfig) -> dict:
    """One day into its partitions; returns its report (small: counts and file names)."""
    state = P.ingest_partition(day, files, partition_store(cfg), cfg.ingest)
    return {"day": day, "skipped": state["skipped"], "seconds": state["seconds"], **{
        k: state["report"][k] for k in ("rows_read", "rows_accepted", "rows_quarantined", "rows_duplicate")}}


def combine_partitions_step(cfg: RunConfig) -> str:
    """Append tonight's new ids to the vocabulary, apply retention, and write the training window as an
    ingested directory (ingested/<window key>), the input of the quality gate, prepare and fine-tuning."""
    store = partition_store(cfg)
    P.update_vocab(store, P.resolve_spec(cfg.ingest).id_type)
    if cfg.flow.retention_delete:
        P.drop_old(store, cfg.flow.retention_days)
    days = P.window(store, cfg.flow.retention_days)
    return str(P.combined_window(store, root(cfg) / "ingested", cfg.ingest, days))


def _model_cache(cfg: RunConfig) -> Path:
    """Registered models' directories, fetched from MLflow once per run id (warm start, gate, index)."""
    return root(cfg) / "serving" / "models"


def _state_path(cfg: RunConfig) -> Path:
    return root(cfg) / "state.json"


def read_state(cfg: RunConfig) -> dict:
    p = _state_path(cfg)
    return json.loads(p.read_text()) if p.exists() else {}


def update_state(cfg: RunConfig, change) -> dict:
    """Read state.json, apply `change(state)` in place and write it back, under a lock: two flows on one
    data directory never lose each other's update."""
    with file_lock(root(cfg) / ".state.lock"):
        state = read_state(cfg)
        change(state)
        write_json(_state_path(cfg), state)
    return state


def quality_step(ingested: str, cfg: RunConfig) -> GateResult:
    """Tonight's ingest against the last accepted one (recorded in data/<name>/state.json)."""
    report = json.loads((Path(ingested) / "report.json").read_text())
    last = read_state(cfg).get("last_ingested")
    previous, known = None, None
    if last and Path(last).exists() and Path(last) != Path(ingested):
        previous = json.loads((Path(last) / "report.json").read_text())
        known = set(json.loads((Path(last) / "vocab.json").read_text())["items"])
    items = set(pl.read_parquet(Path(ingested) / "events.parquet", columns=["item_id"])["item_id"].unique())
    return quality_gate(report, previous, known, items, cfg.flow.gates)


def accept_ingest(ingested: str, cfg: RunConfig) -> None:
    update_state(cfg, lambda state: state.update(last_ingested=ingested))


def prepare_step(ingested: str, cfg: RunConfig) -> str:
    out = root(cfg) / "prepared" / Path(ingested).name
    prepare(ingested, out, cfg.prepare)
    return str(out)


def pretrain_step(prepared: str, model: str, cfg: RunConfig, tracking_uri: str, parent_run_id: str | None,
                  flow_run_id: str | None = None) -> dict:
    tracker = MLflowTracker(tracking_uri)
    # the flow owns `out`: another config's checkpoint there is stale
    pcfg = dataclasses.replace(cfg.pretrain, model=model, resume="restart")
    source, why = warm_start_source(model, prepared, cfg, tracking_uri)
    out = root(cfg) / "runs" / f"{model}-{Path(prepared).name}{'-warm' if source else ''}"
    if (out / "model").exists():  # a finished run of the same data: train anew (an unfinished one resumes)
        shutil.rmtree(out)
    run_name = f"{model} ({Path(prepared).name[:8]}{', warm start' if source else ''})"
    if cfg.flow.nproc > 1:
        res = pretrain_ranks(prepared, dataclasses.replace(cfg, pretrain=pcfg), out, tracking_uri, parent_run_id,
                             run_name, source)
    else:
        done = pretrain(prepared, pcfg, out, tracker=tracker, parent_run_id=parent_run_id, run_name=run_name,
                        init_from=source)
        res = {"run_id": done.run_id, "model_uri": done.model_uri, "model_dir": str(done.model_dir),
               "test": done.test, "valid": done.valid, "seconds": done.seconds}
    set_run_tags(res["run_id"], {"init_reason": why, **({"prefect_flow_run_id": flow_run_id} if flow_run_id else {})},
                 tracking_uri)

    def count_night(state: dict) -> None:
        nights = state.setdefault("trained_nights", {})
        nights[model] = nights.get(model, 0) + 1

    update_state(cfg, count_night)
    return {**res, "warm_start": source is not None, "init": why}


def pretrain_ranks(prepared: str, cfg: RunConfig, out: Path, tracking_uri: str, parent_run_id: str | None,
                   run_name: str, init_from: str | None) -> dict:
    """`pretrain` as `cfg.flow.nproc` data-parallel ranks: the CLI under torchrun (distributed.launch's
    command), with the run's pretrain section written beside `out` as the config it reads. What rank 0 reports."""
    config = out.parent / f".{out.name}.pretrain.yaml"
    section = dataclasses.replace(cfg.pretrain, tracking_uri=tracking_uri)
    write_text(config, yaml.safe_dump({"name": cfg.name, "data_dir": cfg.data_dir, "pretrain": _plain(section)}))
    argv = ["--config", str(config), "pretrain", "--model", cfg.pretrain.model, "--data", str(prepared),
            "--out", str(out), "--run-name", run_name,
            *(["--parent-run-id", parent_run_id] if parent_run_id else []),
            *(["--init-from", str(init_from)] if init_from else [])]
    done = subprocess.run(torchrun_command(argv, cfg.flow.nproc), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"pretraining {cfg.pretrain.model} on {cfg.flow.nproc} ranks failed "
                           f"(exit {done.returncode}): {done.stderr[-2000:]}")
    report = json.loads(done.stdout[done.stdout.index("{"):])
    return {k: report[k] for k in ("run_id", "model_uri", "model_dir", "test", "valid", "seconds")}


def _plain(obj):
    """A config as YAML-safe values (tuples as lists)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def warm_start_source(model: str, prepared: str, cfg: RunConfig, tracking_uri: str) -> tuple[str | None, str]:
    """The champion's model directory to warm-start `model` from tonight, or None, and why."""
    if not cfg.flow.warm_start:
        return None, "from scratch: warm start is off"
    cls, given = model_class(model), cfg.pretrain.model_config(model)
    if cls.closed_form(given):
        return None, f"from scratch: {model} is solved in closed form (seconds): nothing to warm-start"
    champ = get_alias_version(f"{cfg.flow.registry_prefix}-{model}", "champion", tracking_uri)
    if champ is None:
        return None, "from scratch: no champion to start from"
    sources = [root(cfg) / "ingested", *([partition_store(cfg)] if cfg.flow.partitioned else [])]
    forgotten = forget_pending(sources, champion_trained_at(champ["run_id"], tracking_uri))
    if forgotten:  # the champion learnt from users who have since been forgotten: nothing of it is kept
        return None, forgotten
    night = read_state(cfg).get("trained_nights", {}).get(model, 0) + 1
    if cfg.flow.full_retrain_every > 0 and (night - 1) % cfg.flow.full_retrain_every == 0:
        return None, f"from scratch: night {night}, a full retrain every {cfg.flow.full_retrain_every} nights"
    source = resolve_model_dir(champ["run_id"], tracking_uri, cache_dir=_model_cache(cfg))
    old_cfg = json.loads((Path(source) / "model.json").read_text())["config"]
    arch = {k: old_cfg.get(k) for k in cls.shape_keys}  # what sizes and shapes the weights
    resolved, _ = resolve(model, given, load_prepared(prepared).train_seqs)
    now = {k: getattr(resolved, k, None) for k in cls.shape_keys}
    if arch != now:
        return None, f"from scratch: the architecture changed since champion v{champ['version']}"
    overlap = item_overlap(source, Vocab.load(Path(prepared) / "vocab.json"))
    if overlap < cfg.flow.warm_start_min_overlap:
        return None, (f"from scratch: champion v{champ['version']} knows {overlap:.0%} of tonight's items "
                      f"(< {cfg.flow.warm_start_min_overlap:.0%})")
    return str(source), f"warm start from champion v{champ['version']} ({overlap:.0%} of tonight's items known)"


def champion_metric(champ: dict | None, prepared: str, cfg: RunConfig, tracking_uri: str) -> tuple[float | None, str]:
    """The champion's (`get_alias_version`) metric on tonight's held-out data (its model evaluated again
    when it knows tonight's users and items; else the metric it was logged with, said so in the note)."""
    if champ is None:
        return None, "no champion"
    model_dir = resolve_model_dir(champ["run_id"], tracking_uri, cache_dir=_model_cache(cfg))
    net, meta, vocab = load_model_dir(model_dir)
    data = load_prepared(prepared)
    metric = cfg.flow.gates.metric.split("/", 1)[-1]
    if vocab.users.equals(data.vocab.users) and vocab.items.equals(data.vocab.items):
        return evaluate(net, data, "test")[metric], f"champion v{champ['version']} evaluated on tonight's test set"
    logged = run_metrics(champ["run_id"], tracking_uri).get(cfg.flow.gates.metric)
    return logged, f"champion v{champ['version']}: catalogue changed, compared with its logged {cfg.flow.gates.metric}"


def promote(name: str, model_uri: str, value: float, champion_value, gates, cfg: RunConfig,
            tracking_uri: str) -> tuple[int, GateResult, str]:
    """Register `model_uri` as a version of `name` and move `name@champion` to it only if `value` passes
    the promotion gate against the champion's `champion_value(champ) -> (value, note)`.

    Serialised: a lock on the data directory holds one promotion at a time (with the flow's Prefect slot
    around it). Registration is idempotent (a retried task finds the version it registered), and the gate
    runs again if the champion moved between its read and the move (a writer outside the lock); a window
    between the last read and the move remains for such writers. Returns (version, gate, note)."""
    with file_lock(root(cfg) / ".promotion.lock"):
        champ = get_alias_version(name, "champion", tracking_uri)
        champ_value, note = champion_value(champ)
        gate = promotion_gate(value, champ_value, gates)
        version = register_model(model_uri, name, tracking_uri, reuse=True)
        for _ in range(10):
            now = get_alias_version(name, "champion", tracking_uri)
            if (now or {}).get("version") != (champ or {}).get("version"):  # moved meanwhile: gate again
                champ = now
                champ_value, note = champion_value(champ)
                gate = promotion_gate(value, champ_value, gates)
                continue
            if gate.passed:
                set_alias(name, "champion", version, tracking_uri)
            break
        else:
            raise RuntimeError(f"{name}: the champion kept moving during promotion; version {version} stays a challenger")
    return version, gate, note


def promote_step(model_name: str, challenger: dict, prepared: str, cfg: RunConfig, tracking_uri: str) -> dict:
    """Register the challenger; move the `champion` alias to it only if it passes the promotion gate."""
    metric = cfg.flow.gates.metric.split("/", 1)[-1]
    version, gate, note = promote(model_name, challenger["model_uri"], challenger["test"][metric],
                                  lambda champ: champion_metric(champ, prepared, cfg, tracking_uri),
                                  cfg.flow.gates, cfg, tracking_uri)
    decision = {"model": model_name, "version": version, "promoted": gate.passed, "reasons": gate.reasons,
                "note": note, **gate.figures}
    set_run_tags(challenger["run_id"], {"promotion": "promoted" if gate.passed else "rejected",
                                        "promotion_reason": "; ".join(gate.reasons)}, tracking_uri)
    return decision


def finetune_step(ingested: str, cfg: RunConfig, tracking_uri: str, parent_run_id: str | None) -> dict:
    tracker = MLflowTracker(tracking_uri)
    work = root(cfg) / "finetune" / Path(ingested).name
    build_labels(ingested, work / "labels", cfg.finetune.labels)
    mf = dataclasses.replace(cfg.pretrain.mf, loss=cfg.finetune.pretrain_mf_loss)
    pcfg = dataclasses.replace(cfg.pretrain, model="mf", mf=mf)
    pre = pretrain_before_cutoff(work / "labels", pcfg, work / "pretrain",
                                 tracker=tracker, parent_run_id=parent_run_id)
    res = finetune(work / "labels", pre.model_dir, cfg.finetune, work / "ranker", tracker=tracker,
                   parent_run_id=parent_run_id)
    out = {"run_id": res.run_id, "ranker_dir": str(res.ranker_dir), "test": res.test}
    if res.model_uri:  # registered; `champion` (what `--reranker models:/<prefix>-ranker@champion` loads) if better
        name, metric = f"{cfg.flow.registry_prefix}-ranker", "test/click_auc"

        def logged(champ: dict | None) -> tuple[float | None, str]:
            if champ is None:
                return None, "no champion"
            return run_metrics(champ["run_id"], tracking_uri).get(metric), f"champion v{champ['version']}'s logged {metric}"

        version, gate, _ = promote(name, res.model_uri, res.test["click_auc"], logged,
                                   dataclasses.replace(cfg.flow.gates, metric=metric), cfg, tracking_uri)
        out["registered"] = {"model": name, "version": version, "promoted": gate.passed, "reasons": gate.reasons}
    return out


def publish_index_step(cfg: RunConfig, tracking_uri: str, parent_run_id: str | None = None) -> dict:
    """Build the index of the serving champion (of the first model in `flow.serving_order` that has one) and
    publish it: `serving/current.json` is replaced atomically, so readers switch from one complete index to the
    next."""
    for model in cfg.flow.serving_order:
        name = f"{cfg.flow.registry_prefix}-{model}"
        champ = get_alias_version(name, "champion", tracking_uri)
        if champ is not None:
            break
    else:
        return {"published": False, "why": "no champion registered"}
    source = f"models:/{name}@champion"
    with file_lock(root(cfg) / ".promotion.lock"):  # the champion read, its index and the pointer: one step
        champ = get_alias_version(name, "champion", tracking_uri)
        out = root(cfg) / "serving" / f"{name}-v{champ['version']}"
        res = build_model_index(source, out, cfg.index, tracker=MLflowTracker(tracking_uri),
                                tracking_uri=tracking_uri, cache_dir=_model_cache(cfg), parent_run_id=parent_run_id)
        current = {"model": source, "version": champ["version"], "run_id": champ["run_id"], "path": str(out),
                   "recall_at_10": res.meta["recall"].get("recall_at_10"), "index_run_id": res.run_id}
        write_json(root(cfg) / "serving" / "current.json", current)
    return {"published": True, **current}


def summary_markdown(result: dict, tracking_uri: str) -> str:
    tracking_uri = redact_uri(tracking_uri)  # never a password in a summary or a Prefect artifact
    lines = ["# Nightly recsys-pretrain run", "", f"MLflow: `{tracking_uri}`, parent run `{result.get('mlflow_run_id')}`",
             f"(open with `mlflow ui --backend-store-uri {tracking_uri}`)", ""]
    if result.get("stopped"):
        lines += [f"**Stopped before training**: {result['stopped']}", ""]
    for name, r in result.get("models", {}).items():
        t = r["test"]
        lines.append(f"- **{name}**: test NDCG@10 {t['ndcg_at_10']:.4f}, HR@10 {t['hr_at_10']:.4f} "
                     f"(run `{r['run_id']}`)")
    for d in result.get("promotions", []):
        lines.append(f"- {d['model']} v{d['version']}: {'PROMOTED' if d['promoted'] else 'kept champion'} - "
                     f"{'; '.join(d['reasons'])}")
    if result.get("ranker"):
        lines.append(f"- ranker: test click AUC {result['ranker']['test']['click_auc']:.4f}, purchase AUC "
                     f"{result['ranker']['test']['purchase_auc']:.4f}")
    if result.get("index"):
        lines.append(f"- index published at `{result['index'].get('path')}`")
    return "\n".join(lines) + "\n"


def where_things_are(cfg: RunConfig, tracking_uri: str, sample_k: int = 5) -> str:
    """After a run: how to open the MLflow UI on its store, the champions' metrics, and a sample answer
    from the published index (what `make run` prints last)."""
    lines = ["## Where things are", "",
             f"MLflow UI on this store: `mlflow ui --backend-store-uri {redact_uri(tracking_uri)} --port 5000`, then open "
             "http://127.0.0.1:5000", "", "Champions (registered models, alias `champion`):"]
    for model in (*cfg.flow.models, "ranker"):
        name = f"{cfg.flow.registry_prefix}-{model}"
        champ = get_alias_version(name, "champion", tracking_uri)
        if champ is None:
            lines.append(f"- {name}: none")
            continue
        m = run_metrics(champ["run_id"], tracking_uri)
        keys = ("test/click_auc", "test/purchase_auc") if model == "ranker" else ("test/ndcg_at_10", "test/hr_at_10")
        lines.append(f"- {name} v{champ['version']} (run {champ['run_id'][:12]}): "
                     + ", ".join(f"{k} {m[k]:.4f}" for k in keys if k in m))
    pointer = root(cfg) / "serving" / "current.json"
    if pointer.exists():
        rec = load_recommender(ServeConfig(index=str(pointer)), tracking_uri)
        user = rec.vocab.users.drop_nulls()[0]  # (a forgotten user's slot is null)
        answer = rec.recommend([user], sample_k)[0]
        lines += ["", f"Sample answer: `recsys-pretrain recommend --index {pointer} --user {user} -k {sample_k}`", "", "| rank | item_id | score |", "|---:|---|---:|"]
        lines += [f"| {r} | {i} | {s:.4f} |" for r, (i, s) in enumerate(zip(answer.ids, answer.scores, strict=True), 1)]
        lines += ["", f"Serve it: `recsys-pretrain serve --index {pointer}` (http://127.0.0.1:8000/docs)"]
    return "\n".join(lines) + "\n"
