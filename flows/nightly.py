"""The nightly flow: ingest -> quality gate -> prepare -> pretrain mf and sasrec (flow.models) -> promotion
gate -> fine-tune -> build and publish the index. Orchestration only: every task calls one library function
from `recsys_pretrain.nightly` and passes paths, run ids and small dicts.

    python -m flows.nightly --config configs/default.yaml        # once, on Prefect's local API
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run
from prefect_dask import DaskTaskRunner

from recsys_pretrain import nightly as N
from recsys_pretrain.config import RunConfig, load_config
from recsys_pretrain.tracking import MLflowTracker, resolve_tracking_uri

IO_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 5, 10]}
# One promotion (and index publish) at a time across every flow run on this Prefect server; the library
# also locks the data directory and moves the alias by compare-and-set.
PROMOTION_LIMIT = "recsys-pretrain-promotion"


def _promotion_slot():
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(PROMOTION_LIMIT, limit=1)
    return concurrency(PROMOTION_LIMIT, occupy=1, strict=True)


def _ingest_key(context, parameters) -> str:
    """Cache ingest on the input files' content and the ingest settings: an unchanged log is not ingested twice."""
    cfg = json.dumps(parameters["cfg"].ingest.__dict__, sort_keys=True, default=str)
    out_root = str(N.root(parameters["cfg"]))
    return hashlib.sha256((N.content_hash(parameters["inputs"]) + cfg + out_root).encode()).hexdigest()


@task(**IO_RETRIES, timeout_seconds=600)
def synthesize(cfg: RunConfig) -> list[str]:
    return N.synthesize_log(cfg)


@task(**IO_RETRIES, timeout_seconds=1800, cache_key_fn=_ingest_key, persist_result=True)
def ingest(inputs: list[str], cfg: RunConfig) -> str:
    return N.ingest_step(inputs, cfg)


@task(**IO_RETRIES, timeout_seconds=1800)
def ingest_partition(day: str, files: list[str], cfg: RunConfig) -> dict:
    return N.ingest_partition_step(day, files, cfg)


@task(timeout_seconds=1800)
def combine_partitions(cfg: RunConfig) -> str:
    return N.combine_partitions_step(cfg)


def dask_runner(cfg: RunConfig) -> DaskTaskRunner:
    """The cluster at `flow.dask_address`, else a LocalCluster started for the flow run (and closed after)."""
    if cfg.flow.dask_address:
        return DaskTaskRunner(address=cfg.flow.dask_address)
    kwargs: dict = {"processes": cfg.flow.dask_processes}
    if cfg.flow.dask_workers:
        kwargs.update(n_workers=cfg.flow.dask_workers, threads_per_worker=1)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)


@flow(name="ingest-partitions", log_prints=True, validate_parameters=False)
def ingest_partitions(inputs: list[str], cfg: RunConfig) -> dict:
    """Ingest the days not ingested yet (new or changed), one task a day on the Dask task runner, then append
    the vocabulary and combine the training window into one ingested directory."""
    todo = N.plan_partitions_step(inputs, cfg)
    futures = ingest_partition.map(list(todo), list(todo.values()), unmapped(cfg))
    days = [f.result() for f in futures]
    return {"ingested": combine_partitions(cfg), "days": days}


def ingest_partitioned(inputs: list[str], cfg: RunConfig) -> dict:
    """`ingest_partitions` as a sub-flow on the configured Dask task runner."""
    return ingest_partitions.with_options(task_runner=dask_runner(cfg))(N.daily_inputs(inputs, cfg), cfg)


@task(timeout_seconds=300)
def quality(ingested: str, cfg: RunConfig) -> dict:
    gate = N.quality_step(ingested, cfg)
    return {"passed": gate.passed, "reasons": gate.reasons, "figures": gate.figures}


@task(timeout_seconds=1800)
def prepare(ingested: str, cfg: RunConfig) -> str:
    return N.prepare_step(ingested, cfg)


@task(timeout_seconds=4 * 3600)
def pretrain(prepared: str, model: str, cfg: RunConfig, uri: str, parent: str | None, fr: str | None) -> dict:
    return N.pretrain_step(prepared, model, cfg, uri, parent, fr)


@task(**IO_RETRIES, timeout_seconds=600)
def promote(name: str, challenger: dict, prepared: str, cfg: RunConfig, uri: str) -> dict:
    return N.promote_step(name, challenger, prepared, cfg, uri)


@task(timeout_seconds=3600)
def finetune(ingested: str, cfg: RunConfig, uri: str, parent: str | None) -> dict:
    return N.finetune_step(ingested, cfg, uri, parent)


@task(**IO_RETRIES, timeout_seconds=1800)
def publish_index(cfg: RunConfig, uri: str, parent: str | None) -> dict:
    return N.publish_index_step(cfg, uri, parent)


@flow(name="nightly-pretraining", log_prints=True)
def nightly(config: str = "configs/default.yaml", overrides: list[str] | None = None) -> dict:
    cfg = load_config(config, overrides or [])
    log = get_run_logger()
    uri = resolve_tracking_uri(cfg.flow.tracking_uri, cfg.data_dir)
    tracker = MLflowTracker(uri)
    result: dict = {"models": {}, "promotions": []}
    fr = flow_run.id
    with tracker.start_run(f"{cfg.name}-nightly", f"nightly {flow_run.name or ''}".strip(),
                           tags={"prefect_flow_run_id": fr or "", "config": config},
                           description="nightly flow: one parent run, a nested run per stage") as parent:
        result["mlflow_run_id"] = parent
        inputs = list(cfg.flow.inputs) or synthesize(cfg)
        if cfg.flow.partitioned:  # only new or changed days, fanned out on Dask
            partitioned = ingest_partitioned(inputs, cfg)
            ingested = partitioned["ingested"]
            result["partitions"] = partitioned["days"]
        else:
            ingested = ingest(inputs, cfg)
        gate = quality(ingested, cfg)
        tracker.log_metrics({f"quality/{k}": v for k, v in gate["figures"].items()}, step=0)
        if not gate["passed"]:
            result["stopped"] = "data-quality gate: " + "; ".join(gate["reasons"])
            log.warning(result["stopped"])
            tracker.set_tags({"outcome": "stopped by the data-quality gate"})
        else:
            N.accept_ingest(ingested, cfg)
            prepared = prepare(ingested, cfg)
            for model in cfg.flow.models:
                challenger = pretrain(prepared, model, cfg, uri, parent, fr)
                result["models"][model] = challenger
                tracker.log_metrics({f"{model}/test_{k}": v for k, v in challenger["test"].items()}, step=0)
                with _promotion_slot():
                    result["promotions"].append(
                        promote(f"{cfg.flow.registry_prefix}-{model}", challenger, prepared, cfg, uri))
            if cfg.flow.finetune:
                result["ranker"] = finetune(ingested, cfg, uri, parent)
            with _promotion_slot():
                result["index"] = publish_index(cfg, uri, parent)
            tracker.set_tags({"outcome": "trained"})
    md = N.summary_markdown(result, uri)
    create_markdown_artifact(markdown=md, key="nightly-summary", description="MLflow run and key metrics")
    result["summary"] = md
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    res = nightly(args.config, args.overrides)
    print(res["summary"])
    if res.get("index", {}).get("published"):
        cfg = load_config(args.config, args.overrides)
        try:
            print(N.where_things_are(cfg, resolve_tracking_uri(cfg.flow.tracking_uri, cfg.data_dir)))
        except Exception as exc:  # the flow succeeded; a failing summary must not say otherwise
            print(f"(could not summarise where things are: {exc})")
    return 0 if res.get("index") or res.get("stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
