"""`recsys-pretrain`: every stage from the command line.

    recsys-pretrain synth --out data/raw/events.csv
    recsys-pretrain ingest data/raw/events.csv --format generic --out data/ingested [key=value ...]
    recsys-pretrain prepare data/ingested --out data/prepared [key=value ...]
    recsys-pretrain index MODEL --out data/index [key=value ...]
    recsys-pretrain recommend --model MODEL [--index DIR] (--user U | --history i1,i2 | --similar I) -k 10
    recsys-pretrain serve --model MODEL [--index DIR] [--host 127.0.0.1] [--port 8000]
    recsys-pretrain forget DIR [DIR ...] --user ID [--user ID ...] [--key-env VAR | --key-file F]
    recsys-pretrain tune --model bert4rec --data data/prepared --minutes 30 [--trials N] [--out DIR] [key=value ...]
    recsys-pretrain run [--config configs/default.yaml] [key=value ...]

`key=value` overrides address the stage's section (`min_user_events=5`) or the whole config
(`ingest.min_user_events=5`).

Each command imports its stage inside its handler: a command loads only what it runs (MLflow, FAISS,
FastAPI and Prefect's client take seconds to import between them), so `ingest` or `--help` stay quick.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

from recsys_pretrain.config import ConfigError, RunConfig, load_config
from recsys_pretrain.models import MODELS

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")
FORCE_HELP = "replace --out even if this project did not write it (never allowed when it holds an input)"


def _split_overrides(values: list[str], section: str | None) -> tuple[list[str], list[str]]:
    """Positional arguments that look like key=value are overrides; the rest are paths."""
    paths, overrides = [], []
    for v in values:
        if _OVERRIDE.match(v) and not Path(v).exists():
            key = v.split("=", 1)[0]
            known = {"name", "data_dir", "synth", "ingest", "prepare", "pretrain", "finetune", "flow", "index",
                     "serve", "tune"}
            overrides.append(v if section is None or key.split(".")[0] in known else f"{section}.{v}")
        else:
            paths.append(v)
    return paths, overrides


def _config(args: argparse.Namespace, extra: list[str], section: str | None) -> tuple[RunConfig, list[str]]:
    paths, overrides = _split_overrides(extra, section)
    return load_config(args.config, overrides), paths


def _progress_bar(total: int, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="user", disable=not sys.stderr.isatty())
    return bar


def cmd_synth(args: argparse.Namespace, extra: list[str]) -> int:

    cfg, _ = _config(args, extra, "synth")
    synth = cfg.synth
    for name in ("users", "items", "seed"):
        if getattr(args, name) is not None:
            synth = replace(synth, **{f"n_{name}" if name != "seed" else name: getattr(args, name)})
    if args.events_per_user is not None:
        synth = replace(synth, events_per_user=args.events_per_user)
    summary = _synthesize(synth, Path(args.out), args.fmt, Path(args.truth) if args.truth else None)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _synthesize(synth, out: Path, fmt: str, truth: Path | None) -> dict:
    from recsys_pretrain.data.synthetic import write_synthetic

    bar = _progress_bar(synth.n_users, "synth")
    try:
        return write_synthetic(synth, out, fmt=fmt, truth=truth, progress=bar.update)
    finally:
        bar.close()


def cmd_ingest(args: argparse.Namespace, extra: list[str]) -> int:
    from recsys_pretrain.data.ingest import ingest

    cfg, paths = _config(args, list(args.inputs) + extra, "ingest")
    icfg = replace(cfg.ingest, format=args.format) if args.format else cfg.ingest
    if not paths:
        raise ConfigError("ingest: no input files given")
    ingest(paths, args.out, icfg, force=args.force)
    print((Path(args.out) / "report.md").read_text())
    _print_quarantine_sample(Path(args.out))
    return 0


def _print_quarantine_sample(out: Path, n: int = 5) -> None:
    import polars as pl

    q = pl.read_parquet(out / "quarantine.parquet", n_rows=n)
    for row in q.iter_rows(named=True):
        raw = {k: v for k, v in row.items() if k not in ("source_file", "source_row", "reason", "field")}
        print(f"quarantined: {row['source_file']} row {row['source_row']}: {row['reason']}"
              f" (field {row['field']}) {raw}")


def cmd_prepare(args: argparse.Namespace, extra: list[str]) -> int:
    from recsys_pretrain.data.prepare import prepare

    cfg, paths = _config(args, extra, "prepare")
    meta = prepare(args.ingested, args.out, cfg.prepare, force=args.force)
    print(json.dumps({k: v for k, v in meta.items() if k != "config"}, indent=2, default=str))
    return 0


def _tracker(cfg: RunConfig, enabled: bool = True):
    from recsys_pretrain.tracking import MLflowTracker, NullTracker, resolve_tracking_uri

    if not enabled:
        return NullTracker()
    return MLflowTracker(resolve_tracking_uri(cfg.pretrain.tracking_uri, cfg.data_dir))


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def cmd_pretrain(args: argparse.Namespace, extra: list[str]) -> int:
    from recsys_pretrain import distributed as dist  # torch.distributed: only for training
    from recsys_pretrain.train.pretrain import pretrain

    if args.nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1 and not dist.launched():  # run this command again as N ranks under torchrun
        return dist.launch(_without_nproc(args.argv), args.nproc)
    cfg, _ = _config(args, extra, "pretrain")
    pcfg = replace(cfg.pretrain, model=args.model, **({"resume": "never"} if args.restart else {}))
    if args.max_minutes is not None:
        mcfg = getattr(pcfg, args.model)
        pcfg = replace(pcfg, **{args.model: replace(mcfg, train=replace(mcfg.train, max_minutes=args.max_minutes))})
    out = Path(args.out or Path(cfg.data_dir) / "runs" / f"{args.model}-{Path(args.data).resolve().name}")
    dist.init_from_env()  # a rank of a --nproc or torchrun launch joins its group here
    main = dist.is_main()
    res = pretrain(args.data, pcfg, out, tracker=_tracker(cfg, not args.no_tracking) if main else None,
                   run_name=args.run_name, parent_run_id=args.parent_run_id, init_from=args.init_from)
    if not main:  # rank 0 reports
        return 0
    print(json.dumps({"run_id": res.run_id, "model_uri": res.model_uri, "model_dir": str(res.model_dir),
                      "seconds": round(res.seconds, 1), "stopped": res.fit.stopped,
                      "best_epoch": res.fit.best_epoch, "train_seconds": round(res.fit.train_seconds, 1),
                      "valid": res.valid, "test": res.test, "popularity_test": res.popularity_test}, indent=2))
    return 0


def cmd_tune(args: argparse.Namespace, extra: list[str]) -> int:
    """Hyper-parameter search (Optuna) over one model's pretraining; writes best.yaml, prints a JSON summary."""
    from recsys_pretrain.tune import tune

    cfg, _ = _config(args, extra, "pretrain")
    tcfg = cfg.tune
    for name, value in (("model", args.model), ("minutes", args.minutes), ("n_trials", args.trials)):
        if value is not None:
            tcfg = replace(tcfg, **{name: value})
    cfg = replace(cfg, tune=tcfg)
    out = Path(args.out or Path(cfg.data_dir) / "tune" / f"{tcfg.model}-{Path(args.data).resolve().name}")
    res = tune(args.data, cfg, out, tracker=_tracker(cfg, not args.no_tracking))
    print(json.dumps(res.summary(), indent=2, default=str))
    return 0


def cmd_evaluate(args: argparse.Namespace, extra: list[str]) -> int:
    from recsys_pretrain.checkpoint import load_model_dir
    from recsys_pretrain.data.prepared import load_prepared
    from recsys_pretrain.evaluation import evaluate
    from recsys_pretrain.registry import resolve_model_dir

    cfg, _ = _config(args, extra, "pretrain")
    model_dir = resolve_model_dir(args.model, _model_tracking_uri(args.model, cfg))
    model, meta, _ = load_model_dir(model_dir)
    data = load_prepared(args.data)
    if (meta["n_users"], meta["n_items"]) != (data.n_users, data.n_items):
        raise ValueError(f"model has {meta['n_users']} users x {meta['n_items']} items, data "
                         f"{data.n_users} x {data.n_items}: not the same prepared dataset")
    print(json.dumps({"model": meta["model"], "valid": evaluate(model, data, "valid"),
                      "test": evaluate(model, data, "test")}, indent=2))
    return 0


def cmd_labels(args: argparse.Namespace, extra: list[str]) -> int:
    from recsys_pretrain.data.labels import build_labels

    cfg, _ = _config(args, extra, "finetune")
    report = build_labels(args.ingested, args.out, cfg.finetune.labels, force=args.force)
    print(json.dumps(report, indent=2))
    print(f"next: recsys-pretrain prepare {args.out}/pretrain --out PREPARED && recsys-pretrain pretrain "
          f"--model mf --data PREPARED mf.loss=softmax, then finetune --pretrained <its model dir> --data {args.out}")
    return 0


def cmd_finetune(args: argparse.Namespace, extra: list[str]) -> int:
    from recsys_pretrain.registry import resolve_model_dir
    from recsys_pretrain.train.finetune import check_pretrained_before_labels, finetune

    cfg, _ = _config(args, extra, "finetune")
    fcfg = cfg.finetune if args.label_fraction is None else replace(cfg.finetune, label_fraction=args.label_fraction)
    if args.init:
        fcfg = replace(fcfg, init=args.init)
    pretrained = resolve_model_dir(args.pretrained, _model_tracking_uri(args.pretrained, cfg))
    check_pretrained_before_labels(pretrained)
    data = Path(args.data)
    if not (data / "labels.parquet").exists() and (data / "events.parquet").exists():
        from recsys_pretrain.data.labels import build_labels  # an ingested log: label it first

        build_labels(data, data.parent / "labels", fcfg.labels)
        data = data.parent / "labels"
    out = Path(args.out or Path(cfg.data_dir) / "finetune" / f"{fcfg.init}-{fcfg.label_fraction:g}")
    res = finetune(data, pretrained, fcfg, out, tracker=_tracker(cfg, not args.no_tracking))
    print(json.dumps({"run_id": res.run_id, "ranker_dir": str(res.ranker_dir), "train_rows": res.train_rows,
                      "test": res.test}, indent=2, default=str))
    return 0


def _model_tracking_uri(model: str | None, cfg: RunConfig) -> str | None:
    """The MLflow store, resolved unless the model is a local directory (None: not known in advance)."""
    if model is not None and Path(model).is_dir():
        return None
    from recsys_pretrain.tracking import resolve_tracking_uri

    return resolve_tracking_uri(cfg.pretrain.tracking_uri, cfg.data_dir)


def _serve_tracking_uri(scfg, cfg: RunConfig) -> str | None:
    """The MLflow store for `recommend` / `serve`: needed unless the model is a local directory and no
    re-ranker is asked for. A pointer file may name an MLflow model after the next nightly run, whatever
    it names now, so it always gets the store."""
    from recsys_pretrain.serve import sources

    model = None if (scfg.index or "").endswith(".json") or scfg.reranker else sources(scfg)[0]
    return _model_tracking_uri(model, cfg)


def cmd_index(args: argparse.Namespace, extra: list[str]) -> int:
    from recsys_pretrain.index import build_model_index

    cfg, _ = _config(args, extra, "index")
    icfg = replace(cfg.index, factory=args.factory) if args.factory else cfg.index
    res = build_model_index(args.model, args.out, icfg, tracker=_tracker(cfg, not args.no_tracking),
                            tracking_uri=_model_tracking_uri(args.model, cfg), force=args.force)
    m = res.meta
    print(json.dumps({"index": str(res.path), "run_id": res.run_id, "factory": m["resolved_factory"],
                      "mips": m["mips"], "n_items": m["n_items"], "dim": m["dim"], "search": m["search"],
                      "recall": m.get("recall"), "build_seconds": round(m["build"]["seconds"], 2),
                      "index_bytes": m["index_bytes"]}, indent=2, default=str))
    return 0


def _serve_config(args: argparse.Namespace, cfg: RunConfig):
    scfg = cfg.serve
    for name in ("model", "index", "categories", "host", "port", "reranker"):
        if getattr(args, name, None) is not None:
            scfg = replace(scfg, **{name: getattr(args, name)})
    if not scfg.model and not (scfg.index or "").endswith(".json"):
        raise ConfigError("--model (or serve.model): a model directory, an MLflow run id or models:/NAME@ALIAS")
    return scfg


def cmd_recommend(args: argparse.Namespace, extra: list[str]) -> int:
    from recsys_pretrain.serve import load_recommender

    cfg, _ = _config(args, extra, "serve")
    scfg = _serve_config(args, cfg)
    rec = load_recommender(scfg, _serve_tracking_uri(scfg, cfg))
    if args.user:
        label, queries = "user", args.user
        key = _user_key(args, cfg)
        rec = rec.with_user_key(key)  # privacy: raw ids hashed as ingest hashed them
        answers = rec.recommend(args.user, args.k, category=args.category)
        if key is None and any(a.fallback == "unknown_user" for a in answers) and _looks_pseudonymised(rec):
            print("note: the model's user ids look pseudonymised; give the key (--key-env / --key-file or "
                  "ingest.pseudonymise_key_env / _file) to look up raw ids", file=sys.stderr)
    elif args.history is not None:
        label, queries = "history", [args.history]
        history = [x.strip() for x in args.history.split(",") if x.strip()]
        answers = rec.recommend_for_history([history], args.k, category=args.category)
    else:
        label, queries = "similar_to", args.similar
        answers = rec.similar_items(args.similar, args.k, category=args.category)
    if args.json:
        print(json.dumps([{label: q, **a.to_dict()} for q, a in zip(queries, answers, strict=True)], indent=2,
                         default=str))
        return 0
    for q, a in zip(queries, answers, strict=True):
        notes = [a.method] + ([f"fallback: {a.fallback}"] if a.fallback else [])
        notes += [f"unknown: {', '.join(map(str, a.unknown))}"] if a.unknown and not a.fallback else []
        print(f"{label.replace('_', ' ')} {q}  ({'; '.join(notes)})")
        print(f"{'rank':>5}  {'item_id':<20} {'score':>10}")
        for r, (i, sc) in enumerate(zip(a.ids, a.scores, strict=True), 1):
            print(f"{r:>5}  {str(i):<20} {sc:>10.4f}")
        print()
    return 0


def _user_key(args: argparse.Namespace, cfg: RunConfig) -> bytes | None:
    """The pseudonymisation key: --key-env / --key-file, else the config's ingest settings, else its serve
    settings (serve.user_key_env / _file); None if none."""
    from recsys_pretrain.privacy import key_from_config, load_key

    if args.key_env or args.key_file:
        return load_key(args.key_env, args.key_file)
    key = key_from_config(cfg.ingest)
    if key is None and (cfg.serve.user_key_env or cfg.serve.user_key_file):
        key = load_key(cfg.serve.user_key_env, cfg.serve.user_key_file)
    return key


def _looks_pseudonymised(rec) -> bool:
    from recsys_pretrain.privacy import looks_pseudonymised

    return looks_pseudonymised(rec.vocab.users)


def _add_key_options(s: argparse.ArgumentParser) -> None:
    k = s.add_mutually_exclusive_group()
    k.add_argument("--key-env", metavar="VAR", help="environment variable holding the key user ids were "
                   "pseudonymised with at ingest (default: ingest.pseudonymise_key_env / _file of the config)")
    k.add_argument("--key-file", metavar="FILE", help="file holding that key")


def cmd_forget(args: argparse.Namespace, extra: list[str]) -> int:
    """Remove users' rows from ingested directories; the next nightly run then retrains from scratch."""
    from recsys_pretrain.data.forget import forget
    from recsys_pretrain.data.partitions import STATE, forget_store

    cfg, dirs = _config(args, list(args.data) + extra, "ingest")
    users = list(args.user or [])
    if args.users_file:  # a file keeps the ids out of the shell history and the process list
        users += [line.strip() for line in Path(args.users_file).read_text().splitlines() if line.strip()]
    if not users:
        raise ConfigError("forget: give the users with --user ID (repeatable) or --users-file FILE")
    if not dirs:
        raise ConfigError("forget: no ingested directory given")
    key = _user_key(args, cfg)
    for d in dirs:  # a partition store (flow.partitioned) or an ingested directory
        res = forget_store(d, users, cfg.ingest, key=key) if (Path(d) / STATE).is_dir() else forget(d, users, key=key)
        missing = len(res["not_found"])
        if not res["changed"]:
            print(f"{d}: nothing removed: it holds no rows of the {len(users)} user(s) given")
            continue
        print(f"{d}: forgot {res['users_found']} user(s): {res['events_removed']:,} events and "
              f"{res['quarantine_removed']:,} quarantined rows removed, {res['items_dropped']:,} item(s) left "
              f"without events dropped; the next nightly run trains from scratch")
        if missing:
            which = ", ".join(f"#{i + 1}" for i in res["not_found"][:20])
            print(f"{d}: {missing} of the users given hold no rows here (given as {which})")
    return 0


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    from recsys_pretrain.serve import serve

    cfg, _ = _config(args, extra, "serve")
    scfg = _serve_config(args, cfg)
    if args.reload_poll_s is not None:
        scfg = replace(scfg, reload_poll_s=args.reload_poll_s)
    serve(scfg, tracking_uri=_serve_tracking_uri(scfg, cfg))
    return 0


def cmd_run(args: argparse.Namespace, extra: list[str]) -> int:
    """The data stages on the configured log, where and as the nightly flow runs them: generate it (when
    `flow.inputs` is empty), ingest, prepare, print the report. The whole pipeline with training, registry and
    index is the nightly flow (`make run`)."""
    from recsys_pretrain import nightly  # the flow's own steps and paths (loads every stage: seconds)

    cfg, _ = _config(args, extra, None)
    inputs = list(cfg.flow.inputs)
    if not inputs:
        print(f"[1/3] synthesising {cfg.synth.n_users:,} users x {cfg.synth.n_items:,} items")
        inputs = nightly.synthesize_log(cfg)
    print(f"[2/3] ingesting {', '.join(inputs)}")
    ingested = Path(nightly.ingest_step(inputs, cfg))
    print(f"[3/3] preparing {ingested}")
    prepared = Path(nightly.prepare_step(str(ingested), cfg))
    meta = json.loads((prepared / "meta.json").read_text())
    report = json.loads((ingested / "report.json").read_text())
    print()
    print((ingested / "report.md").read_text())
    print(f"ingested: {ingested}\nprepared: {prepared}")
    print(f"prepared: {meta['n_users']:,} users, {meta['n_items']:,} items, {meta['interactions']:,} interactions, "
          f"{meta['loo']['users_with_test']:,} users with a held-out test item; matrix nnz {meta['matrix']['nnz']:,}")
    print(f"rows read {report['rows_read']:,} = accepted {report['rows_accepted']:,} + quarantined "
          f"{report['rows_quarantined']:,} + duplicate {report['rows_duplicate']:,}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recsys-pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config file (see configs/)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="generate a synthetic behaviour log")
    s.add_argument("--out", required=True)
    s.add_argument("--fmt", choices=["csv", "parquet"], default="csv")
    s.add_argument("--users", type=int)
    s.add_argument("--items", type=int)
    s.add_argument("--events-per-user", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--truth", help="also write the ground-truth affinities (.npz)")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("ingest", help="validate, quarantine, dedupe and index raw logs")
    s.add_argument("inputs", nargs="+", help="input files (csv, tsv, txt, parquet, ndjson; .gz ok), then key=value")
    s.add_argument("--format", choices=["generic", "movielens", "sasrec", "taobao", "retailrocket"])
    s.add_argument("--out", required=True)
    s.add_argument("--force", action="store_true", help=FORCE_HELP)
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("prepare", help="sequences, splits and the interaction matrix from an ingested log")
    s.add_argument("ingested")
    s.add_argument("--out", required=True)
    s.add_argument("--force", action="store_true", help=FORCE_HELP)
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("pretrain", help="train a model on a prepared dataset, tracked in MLflow")
    s.add_argument("--model", choices=sorted(MODELS), required=True)
    s.add_argument("--data", required=True, help="a prepared directory")
    s.add_argument("--out", help="output directory (checkpoints/, model/)")
    s.add_argument("--max-minutes", type=float,
                   help="training budget; the schedule spans the model's train.epochs (with "
                        "bert4rec.train.budget_horizon=true, the epochs the budget fits)")
    s.add_argument("--no-tracking", action="store_true", help="do not record the run in MLflow")
    s.add_argument("--init-from", help="a trained model directory of the same architecture to warm-start from")
    s.add_argument("--run-name", help="the MLflow run's name")
    s.add_argument("--parent-run-id", help="an MLflow run to nest this one under")
    s.add_argument("--nproc", type=int, default=1,
                   help="data-parallel ranks on this machine: the command runs again under torchrun as N "
                        "processes (gloo on CPU, NCCL on GPUs); rank 0 writes the outputs and the MLflow run")
    s.add_argument("--restart", action="store_true",
                   help="start anew even if --out holds a checkpoint (by default only a checkpoint of the same "
                        "config and data is resumed, and another run's is refused)")
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("tune", help="hyper-parameter search (Optuna TPE, pruned on validation NDCG@10) within a "
                                    "time budget; writes best.yaml, a config that `pretrain` accepts")
    s.add_argument("--model", choices=sorted(MODELS), help="the model to tune (default: tune.model)")
    s.add_argument("--data", required=True, help="a prepared directory")
    s.add_argument("--minutes", type=float, help="total budget (default: tune.minutes); each trial is capped at "
                                                 "tune.trial_max_minutes (default: a quarter of it)")
    s.add_argument("--trials", type=int, help="at most this many trials (default: tune.n_trials, else the budget)")
    s.add_argument("--out", help="output directory (best.yaml, tune.json, trials.csv, the best trial's model)")
    s.add_argument("--no-tracking", action="store_true", help="do not record the study in MLflow")
    s.set_defaults(func=cmd_tune)

    s = sub.add_parser("evaluate", help="full-ranking metrics of a model directory or MLflow run on prepared data")
    s.add_argument("model", help="a model directory or an MLflow run id")
    s.add_argument("--data", required=True)
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("labels", help="time-split click/purchase labels (and the pre-T1 events to pretrain on)")
    s.add_argument("ingested")
    s.add_argument("--out", required=True)
    s.add_argument("--force", action="store_true", help=FORCE_HELP)
    s.set_defaults(func=cmd_labels)

    s = sub.add_parser("finetune", help="train the click/purchase ranker on pretrained embeddings")
    s.add_argument("--pretrained", required=True, help="a model directory (pretrained before T1) or MLflow run id")
    s.add_argument("--data", required=True, help="a labels directory (from `labels`) or an ingested log")
    s.add_argument("--label-fraction", type=float)
    s.add_argument("--init", choices=["frozen", "finetuned", "random"])
    s.add_argument("--out")
    s.add_argument("--no-tracking", action="store_true")
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("index", help="build, tune and save the FAISS candidate index of a trained model")
    s.add_argument("model", help="a model directory, an MLflow run id or models:/NAME@ALIAS")
    s.add_argument("--out", required=True, help="the index directory (replaced atomically)")
    s.add_argument("--factory", help="a faiss.index_factory string (Flat, HNSW32, IVF1024,Flat) or auto")
    s.add_argument("--no-tracking", action="store_true", help="do not record the build in MLflow")
    s.add_argument("--force", action="store_true", help=FORCE_HELP)
    s.set_defaults(func=cmd_index)

    s = sub.add_parser("recommend", help="top-k items for a user, a history or an item, from a model's index")
    s.add_argument("--model", help="a model directory, an MLflow run id or models:/NAME@ALIAS")
    s.add_argument("--index", help="an index directory or a pointer file (.json, as the nightly flow publishes); default: exact search built in memory")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--user", action="append", help="a raw user id (repeat for several)")
    q.add_argument("--history", help="raw item ids, comma-separated, oldest first")
    q.add_argument("--similar", action="append", help="a raw item id (repeat for several)")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--category", help="only items of this category (needs --categories)")
    s.add_argument("--categories", help="table with item_id, category_id (e.g. an ingested events.parquet)")
    s.add_argument("--reranker", help="re-rank the candidates with a fine-tuned ranker (MLflow model URI, e.g. "
                                      "models:/recsys-ranker@champion)")
    s.add_argument("--json", action="store_true", help="JSON instead of a table")
    _add_key_options(s)
    s.set_defaults(func=cmd_recommend)

    s = sub.add_parser("forget", help="remove users' rows from ingested data (the next nightly run retrains "
                                      "from scratch)")
    s.add_argument("data", nargs="+", help="ingested directories or partition stores, then key=value")
    s.add_argument("--user", action="append", help="a raw user id (repeat for several)")
    s.add_argument("--users-file", help="a file of raw user ids, one per line")
    _add_key_options(s)
    s.set_defaults(func=cmd_forget)

    s = sub.add_parser("serve", help="the HTTP candidate service (FastAPI + uvicorn)")
    s.add_argument("--model", help="a model directory, an MLflow run id or models:/NAME@ALIAS")
    s.add_argument("--index", help="an index directory, or a pointer file (.json: model + index, as the nightly "
                                   "flow publishes: followed, and waited for until it is first published); "
                                   "default: exact search built in memory")
    s.add_argument("--categories", help="table with item_id, category_id for the category filter")
    s.add_argument("--host", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int)
    s.add_argument("--reranker", help="re-rank the candidates with a fine-tuned ranker (MLflow model URI)")
    s.add_argument("--reload-poll-s", type=float, metavar="SECONDS",
                   help="how often the pointer file / index / model alias is checked for a new publication, "
                        "swapped in without a restart (serve.reload_poll_s, default 5; 0 = only POST /admin/reload)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("run", help="the data stages once (generate, ingest, prepare); the whole "
                                          "pipeline is the nightly flow: `make run`")
    s.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    from recsys_pretrain.data.formats import IngestError
    from recsys_pretrain.io import is_disk_full

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `--nproc` runs again under torchrun
    unknown_flags = [e for e in extra if e.startswith("-")]
    if unknown_flags:
        parser.error(f"unrecognised arguments: {' '.join(unknown_flags)}")
    try:
        return args.func(args, extra)
    except (ConfigError, IngestError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a full disk surfaces from os, Polars, NumPy or torch, each in its own type
        if not is_disk_full(exc, getattr(args, "out", None) or getattr(args, "data", None)):
            raise
        where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"error: no space left on the device{where}; nothing was published, the previous outputs are "
              f"as they were. Free some space and run the command again ({type(exc).__name__})", file=sys.stderr)
        return 28  # ENOSPC


if __name__ == "__main__":
    sys.exit(main())
