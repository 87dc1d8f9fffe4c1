"""The pretraining stage: load prepared data, train any registered model (or solve it, for a closed-form
model), evaluate by full ranking, export embeddings and a model directory, and track it all.

Evaluation (recsys_pretrain/evaluation.py) is leave-last-out over the whole catalogue with the user's history
excluded. Model selection uses validation only; the chosen model is then refit with each user's validation
item (`pretrain.refit`) and tested once.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from recsys_pretrain import distributed as dist
from recsys_pretrain.checkpoint import build_model, save_model_dir, warm_start
from recsys_pretrain.config import PretrainConfig, TrainConfig
from recsys_pretrain.data.prepared import PreparedData, history_matrix, load_prepared
from recsys_pretrain.evaluation import embeddings, evaluate, evaluate_popularity
from recsys_pretrain.io import check_output
from recsys_pretrain.metrics import popularity_scores
from recsys_pretrain.models import RecModel, model_class, resolve
from recsys_pretrain.pyfunc import log_recommender
from recsys_pretrain.tracking import NullTracker, git_commit, redact_uri
from recsys_pretrain.train.loop import MONITOR, FitResult, fit, save_checkpoint

log = logging.getLogger(__name__)


# ---- the stage ----------------------------------------------------------------------------------------------
# Settings that change how a run is watched or how long it may take, not the model it trains: a checkpoint
# written under other values of these is the same run and may be resumed.
OPERATIONAL = ("progress", "threads", "eval_batch_size", "max_minutes")


def run_fingerprint(name: str, mcfg, tcfg: TrainConfig, data: PreparedData, init_from: str | Path | None) -> dict:
    """What defines a training run: the model and its config (the training settings in force), the data
    (the ingested events' hash and the prepare settings) and the warm-start source."""
    train = {k: v for k, v in dataclasses.asdict(tcfg).items() if k not in OPERATIONAL}
    return {"model": name, "config": {**dataclasses.asdict(mcfg), "train": train},
            "data": {"events_sha256": data.meta.get("events_sha256"), "prepare": data.meta.get("config"),
                     "users": data.n_users, "items": data.n_items},
            "init_from": str(init_from) if init_from is not None else None}


@dataclass
class Solved:
    """A closed-form fit: the chosen model, its config and solver settings, and the fit as the loop reports it."""

    model: RecModel
    config: object
    params: dict
    fit: FitResult


def fit_closed_form(name: str, mcfg, data: PreparedData, tcfg: TrainConfig, validate: Callable[[RecModel], dict],
                    checkpoint_dir: Path, free_dim: bool = False,
                    on_epoch: Callable[[int, dict], None] | None = None) -> Solved:
    """A closed-form model: each candidate setting (`candidates`) solved on the training matrix and validated;
    the best is kept. Reported as a fit with one "epoch" per candidate (the loss: what `solve` returns)."""
    t0 = time.perf_counter()
    best, history = None, []
    for i, (cfg, params) in enumerate(model_class(name).candidates(mcfg, free_dim), 1):
        model = build_model(name, cfg, data.n_users, data.n_items)
        loss = model.solve(data.train_matrix, params, tcfg.seed)
        metrics = validate(model)
        row = {"epoch": i, "train_loss": loss, **{f"val_{k}": v for k, v in metrics.items()},
               "elapsed_s": time.perf_counter() - t0}
        history.append(row)
        if best is None or metrics[MONITOR] > best[1][MONITOR]:
            best = (i, metrics, params, model, cfg)
        if on_epoch is not None:
            on_epoch(i, row)
    i, metrics, params, model, cfg = best
    path = checkpoint_dir / "best.pt"
    save_checkpoint(path, {"model": model.state_dict(), "epoch": i, "metrics": metrics, "params": params})
    result = FitResult(best_epoch=i, best_metrics=metrics, epochs_run=len(history), stopped="closed_form",
                       train_seconds=time.perf_counter() - t0, history=history, best_checkpoint=path)
    return Solved(model=model, config=cfg, params=params, fit=result)


def refit_loop(model: RecModel, name: str, mcfg, data: PreparedData, tcfg: TrainConfig, chosen: FitResult,
               share: float, seconds_left: float | None, checkpoint_dir: Path, fingerprint: dict,
               resume: str = "match") -> FitResult:
    """Continue training the chosen model on train + validation (each user's validation item appended)
    for `share / (1 - share)` of its epochs, from the learning rate it was chosen at down to zero, with no
    validation (the validation items are now training data). Under a budget, within `seconds_left`."""
    epochs = max(1, round(share / (1 - share) * chosen.best_epoch))
    lr = next((h["lr"] for h in chosen.history if h["epoch"] == chosen.best_epoch), tcfg.lr)
    rcfg = dataclasses.replace(tcfg, epochs=epochs, lr=lr, warmup_steps=0, schedule="linear", seed=tcfg.seed + 1,
                               max_minutes=None if seconds_left is None else max(seconds_left, 1.0) / 60)
    task = model_class(name).task(dataclasses.replace(mcfg, train=rcfg), data.with_validation())
    return fit(model, task, rcfg, None, checkpoint_dir=checkpoint_dir, fingerprint={**fingerprint, "refit": epochs},
               resume=resume)


def training_curve(history: list[dict], title: str):
    from matplotlib.figure import Figure  # heavy (a fraction of a second): only where a figure is drawn

    fig = Figure(figsize=(7, 4))  # no pyplot: nothing global to close
    ax1 = fig.subplots()
    ep = [h["epoch"] for h in history]
    ax1.plot(ep, [h["train_loss"] for h in history], color="tab:blue", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss", color="tab:blue")
    ax2 = ax1.twinx()
    ev = [(h["epoch"], h["val_ndcg_at_10"]) for h in history if "val_ndcg_at_10" in h]
    if ev:
        ax2.plot(*zip(*ev, strict=True), color="tab:orange", marker="o", label="validation NDCG@10")
    ax2.set_ylabel("validation NDCG@10", color="tab:orange")
    ax1.set_title(title)
    fig.tight_layout()
    return fig


@dataclass
class PretrainResult:
    run_id: str | None
    model_dir: Path
    fit: FitResult | None  # None on a rank other than 0 of a closed-form model
    valid: dict[str, float]
    test: dict[str, float]
    popularity_test: dict[str, float]
    seconds: float
    model_uri: str | None = None  # the logged pyfunc model, for the registry
    warm_start: dict | None = None  # what was carried over from `init_from`, if given
    test_no_refit: dict[str, float] | None = None  # the chosen model's test, before the refit with validation
    refit_seconds: float = 0.0


def pretrain(prepared: str | Path, cfg: PretrainConfig, out_dir: str | Path, tracker=None,
             run_name: str | None = None, parent_run_id: str | None = None,
             on_epoch: Callable[[int, dict], None] | None = None,
             init_from: str | Path | None = None) -> PretrainResult:
    """Train `cfg.model` on a prepared dataset; write `out_dir/{checkpoints,model}`; track the run.
    `on_epoch(epoch, history_row)` is called after each epoch (after its checkpoint is written).
    `init_from`: a trained model directory of the same architecture to warm-start from (items and users by
    raw id, new ones fresh); the run then gets `cfg.warm_epoch_share` of the epoch budget.

    Under torchrun (recsys_pretrain/distributed.py) every rank trains its share of each batch in the one loop,
    and rank 0 alone validates, tests, writes the model directory and tracks the run; the other ranks return a
    result with the fit only. A closed-form model is solved by rank 0 alone."""
    dist.init_from_env()
    main = dist.is_main()
    tracker = (tracker or NullTracker()) if main else NullTracker()
    data = load_prepared(prepared)
    given = cfg.model_config()
    cls = model_class(cfg.model)
    mcfg, recipe = resolve(cfg.model, given, data.train_seqs)
    for key, rule in recipe.items():
        if main:
            print(f"{cfg.model}.{key}: {rule}", file=sys.stderr)
    tcfg = mcfg.train
    torch.manual_seed(tcfg.seed)
    model = build_model(cfg.model, mcfg, data.n_users, data.n_items)
    warm = None
    closed_form = cls.closed_form(mcfg)
    if closed_form and not main:  # nothing to share: rank 0 solves it
        return PretrainResult(run_id=None, model_dir=Path(out_dir) / "model", fit=None, valid={}, test={},
                              popularity_test={}, seconds=0.0)
    if init_from is not None and closed_form:
        log.info("%s is solved in closed form: nothing to warm-start from %s", cfg.model, init_from)
    elif init_from is not None:
        warm = warm_start(model, cfg.model, data.vocab, init_from)
        share = cfg.warm_epoch_share
        tcfg = dataclasses.replace(tcfg, epochs=max(1, round(tcfg.epochs * share)),
                                   eval_every=min(tcfg.eval_every, max(1, round(tcfg.epochs * share))),
                                   warmup_steps=round(tcfg.warmup_steps * share))
    out_dir = Path(out_dir)
    if main:
        check_output(out_dir / "model", inputs=[data.path] + ([init_from] if init_from is not None else []))
    fingerprint = run_fingerprint(cfg.model, mcfg, tcfg, data, init_from)
    experiment = cfg.experiment or data.name
    run_name = run_name or f"{cfg.model}-{data.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = {"model_type": cfg.model, "dataset": data.name, "dataset_sha256": data.meta.get("events_sha256", ""),
            "git_commit": git_commit() or "unknown", "init": "warm start" if warm else "from scratch"}
    t0 = time.perf_counter()
    with tracker.start_run(experiment, run_name, tags=tags, parent_run_id=parent_run_id,
                           description=f"{cfg.model} pretraining on {data.name}: leave-last-out, full ranking, "
                                       "history excluded; model chosen on validation NDCG@10") as run_id:
        tracker.log_params({"model": cfg.model, cfg.model: dataclasses.asdict(mcfg),
                                    **({"warm_start": {**warm, "epochs": tcfg.epochs}} if warm else {}),
                                    **({"recipe": recipe} if recipe else {}),
                                    "data": {"users": data.n_users, "items": data.n_items,
                                             "interactions": data.meta.get("interactions")}})
        tracker.log_input(name=data.name, digest=data.meta.get("events_sha256", "")[:32],
                          counts={"users": data.n_users, "items": data.n_items,
                                  "interactions": int(data.meta.get("interactions", 0)),
                                  "train_interactions": int(data.meta["loo"]["train_interactions"])},
                          source=str(data.path))

        def log_epoch(epoch: int, row: dict) -> None:
            tracker.log_metrics({k.replace("val_", "valid/").replace("train_loss", "train/loss"): v
                                 for k, v in row.items() if k != "epoch"}, step=epoch)
            if on_epoch is not None:
                on_epoch(epoch, row)

        validate = lambda m: evaluate(m, data, "valid", tcfg.eval_batch_size)  # noqa: E731
        chosen = None
        if closed_form:
            solved = fit_closed_form(cfg.model, mcfg, data, tcfg, validate, out_dir / "checkpoints",
                                     free_dim=getattr(given, "dim", 0) is None, on_epoch=log_epoch)
            model, mcfg, result, chosen = solved.model, solved.config, solved.fit, solved.params
            tracker.log_params({"chosen": chosen})
        else:
            task = cls.task(mcfg, data)
            # under a budget with a refit to come, the chosen model gets (1 - refit_share) of it
            budget = tcfg.max_minutes
            first = tcfg if not (cfg.refit and budget) else dataclasses.replace(
                tcfg, max_minutes=budget * (1 - cfg.refit_share))
            result = fit(model, task, first, validate, checkpoint_dir=out_dir / "checkpoints", on_epoch=log_epoch,
                         fingerprint=fingerprint, resume=cfg.resume)
        valid = evaluate(model, data, "valid", tcfg.eval_batch_size) if main else {}
        test = evaluate(model, data, "test", tcfg.eval_batch_size) if main else {}
        test_no_refit, refit_seconds = None, 0.0
        if cfg.refit:  # learn from the validation items too, then test once more
            t1 = time.perf_counter()
            if closed_form:  # the chosen setting solved again
                model.solve(data.with_validation().train_matrix, chosen, tcfg.seed)
            else:
                left = None if not tcfg.max_minutes else tcfg.max_minutes * 60 - result.train_seconds
                refit_loop(model, cfg.model, mcfg, data, tcfg, result, cfg.refit_share, left,
                           out_dir / "checkpoints" / "refit", fingerprint, cfg.resume)
            refit_seconds = time.perf_counter() - t1
            test_no_refit, test = test, evaluate(model, data, "test", tcfg.eval_batch_size) if main else {}
        if not main:  # the other ranks have done their share of the training
            return PretrainResult(run_id=None, model_dir=out_dir / "model", fit=result, valid={}, test={},
                                  popularity_test={}, seconds=time.perf_counter() - t0)
        pop = evaluate_popularity(data, "test")
        final = {**{f"test/{k}": v for k, v in test.items()}, **{f"valid/{k}": v for k, v in valid.items()},
                 **{f"test/popularity_{k}": v for k, v in pop.items()},
                 **{f"test_no_refit/{k}": v for k, v in (test_no_refit or {}).items()},
                 "train/seconds": result.train_seconds + refit_seconds, "train/refit_seconds": refit_seconds,
                 "train/epochs": result.epochs_run, "train/best_epoch": result.best_epoch}
        tracker.log_metrics(final, step=result.epochs_run)
        tracker.set_tags({"stopped": result.stopped})

        item_emb, user_emb = embeddings(model, data)
        model_dir = save_model_dir(out_dir / "model", cfg.model, mcfg, model, data.vocab, item_emb, user_emb,
                                   histories=history_matrix(data.full_sequences(), data.n_items),
                                   popularity=popularity_scores(data.train_matrix).numpy(),
                                   extra={"dataset": data.name, "test": test, "valid": valid,
                                          "test_no_refit": test_no_refit, "chosen": chosen,
                                          "best_epoch": result.best_epoch, "run_id": run_id})
        tracker.log_figure(training_curve(result.history, f"{cfg.model} on {data.name}"), "training_curve.png")
        tracker.log_dict({**dataclasses.asdict(cfg), "tracking_uri": redact_uri(cfg.tracking_uri)}, "config.json")
        tracker.log_dict({"valid": valid, "test": test, "test_no_refit": test_no_refit, "popularity_test": pop,
                          "history": result.history}, "metrics.json")
        tracker.log_model_dir(model_dir, name="model_dir")  # what `evaluate RUN_ID` and serving fetch
        if result.best_checkpoint is not None and result.best_checkpoint.exists():
            tracker.log_artifact(result.best_checkpoint, "checkpoints")
        model_uri = log_recommender(tracker, model_dir, name="model")
    return PretrainResult(run_id=run_id, model_dir=model_dir, fit=result, valid=valid, test=test,
                          popularity_test=pop, seconds=time.perf_counter() - t0, model_uri=model_uri,
                          warm_start=warm, test_no_refit=test_no_refit, refit_seconds=refit_seconds)
