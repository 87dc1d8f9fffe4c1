"""The pretraining stage: load prepared data, train `mf` or `bert4rec`, evaluate by full ranking, export
embeddings and a model directory, and track it all.

Evaluation is leave-last-out over the whole catalogue with the user's history excluded: validation
ranks each user's second-to-last item given the items before it, test ranks the last item given all
the items before it. Model selection uses validation only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch
from torch import nn

from recsys_pretrain.checkpoint import build_model, save_model_dir, warm_start
from recsys_pretrain.config import BERT4RecConfig, MFConfig, PretrainConfig, TrainConfig, flatten
from recsys_pretrain.io import check_output
from recsys_pretrain.masking import append_mask, mask_items
from recsys_pretrain.metrics import evaluate_scores, popularity_scores
from recsys_pretrain.recipes import ALS_GRID
from recsys_pretrain.recipes import resolve as resolve_recipe
from recsys_pretrain.train.loop import MONITOR, FitResult, fit, save_checkpoint
from recsys_pretrain.vocab import Vocab

log = logging.getLogger(__name__)


# ---- data -----------------------------------------------------------------------------------------------
@dataclass
class PreparedData:
    name: str
    path: Path
    vocab: Vocab
    meta: dict
    train_seqs: list[np.ndarray]  # per user index: training items in order (empty if none)
    valid: np.ndarray  # (n_users,) validation target item, -1 if none
    test: np.ndarray  # (n_users,) test target item, -1 if none
    train_matrix: sp.csr_matrix  # (n_users, n_items + 1) event-weighted, training events only

    @property
    def n_users(self) -> int:
        return self.vocab.n_users

    @property
    def n_items(self) -> int:
        return self.vocab.n_items

    def histories(self, stage: str) -> list[np.ndarray]:
        """What the model may see when predicting `stage`'s target: train items (+ validation item for test)."""
        if stage == "valid":
            return self.train_seqs
        return [np.append(s, v) if v >= 0 else s for s, v in zip(self.train_seqs, self.valid, strict=True)]

    def targets(self, stage: str) -> np.ndarray:
        return self.valid if stage == "valid" else self.test

    def full_sequences(self) -> list[np.ndarray]:
        """Every interaction, for user vectors at serving time."""
        return [np.append(s, t) if t >= 0 else s for s, t in zip(self.histories("test"), self.test, strict=True)]


def load_prepared(path: str | Path) -> PreparedData:
    path = Path(path)
    if not (path / "loo.parquet").exists():
        raise FileNotFoundError(f"{path}: no loo.parquet; run `recsys-pretrain prepare` first")
    vocab = Vocab.load(path / "vocab.json")
    meta = json.loads((path / "meta.json").read_text())
    loo = pl.read_parquet(path / "loo.parquet", columns=["user_idx", "train", "valid", "test"])
    seqs = [np.zeros(0, dtype=np.int64)] * vocab.n_users
    valid = np.full(vocab.n_users, -1, dtype=np.int64)
    test = np.full(vocab.n_users, -1, dtype=np.int64)
    users = loo["user_idx"].to_numpy()
    for u, items in zip(users, loo["train"].to_list(), strict=True):
        seqs[u] = np.asarray(items, dtype=np.int64)
    valid[users] = loo["valid"].fill_null(-1).to_numpy()
    test[users] = loo["test"].fill_null(-1).to_numpy()
    name = meta.get("dataset") or path.name
    return PreparedData(name=name, path=path, vocab=vocab, meta=meta, train_seqs=seqs, valid=valid, test=test,
                        train_matrix=sp.load_npz(path / "train_matrix.npz").tocsr())


def history_matrix(seqs: list[np.ndarray], n_items: int) -> sp.csr_matrix:
    """Binary (n_users, n_items + 1) matrix of the items in each sequence: what evaluation excludes."""
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    indptr = np.concatenate([[0], np.cumsum(lens)])
    cols = np.concatenate(seqs) if len(seqs) else np.zeros(0, dtype=np.int64)
    m = sp.csr_matrix((np.ones(len(cols), dtype=np.float32), cols, indptr), shape=(len(seqs), n_items + 1))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def left_pad(seqs: list[np.ndarray], length: int) -> np.ndarray:
    """(n, length) int64: each sequence's last `length` items, right-aligned, zeros in front."""
    out = np.zeros((len(seqs), length), dtype=np.int64)
    for r, s in enumerate(seqs):
        s = s[-length:]
        if len(s):
            out[r, length - len(s):] = s
    return out


# ---- tasks: where each model's batches come from --------------------------------------------------------
class MFSoftmaxTask:
    """Batches of users with their interaction rows as multinomial targets."""

    def __init__(self, matrix: sp.csr_matrix, batch_size: int):
        self.matrix = matrix[:, 1:].tocsr()  # drop the padding column: (n_users, n_items)
        self.users = np.flatnonzero(np.diff(self.matrix.indptr) > 0)
        self.batch_size = batch_size

    def n_batches(self) -> int:
        return -(-len(self.users) // self.batch_size)

    def batches(self, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        order = self.users[torch.randperm(len(self.users), generator=generator).numpy()]
        for i in range(0, len(order), self.batch_size):
            u = order[i : i + self.batch_size]
            yield {"users": torch.from_numpy(u), "targets": torch.from_numpy(self.matrix[u].toarray())}


class MFBPRTask:
    """Batches of (user, positive, uniformly sampled negative) triples."""

    def __init__(self, matrix: sp.csr_matrix, batch_size: int, n_items: int):
        coo = matrix.tocoo()
        self.users, self.items = coo.row.astype(np.int64), coo.col.astype(np.int64)
        self.batch_size, self.n_items = batch_size, n_items

    def n_batches(self) -> int:
        return -(-len(self.users) // self.batch_size)

    def batches(self, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.randperm(len(self.users), generator=generator)
        for i in range(0, len(order), self.batch_size):
            idx = order[i : i + self.batch_size].numpy()
            neg = torch.randint(1, self.n_items + 1, (len(idx),), generator=generator)
            yield {"users": torch.from_numpy(self.users[idx]), "pos": torch.from_numpy(self.items[idx]), "neg": neg}


class SequenceTask:
    """Batches of masked training sequences for BERT4Rec (masking happens here, in collate)."""

    BUCKET_POOL = 64  # batches per length-sorted pool

    def __init__(self, seqs: list[np.ndarray], cfg: BERT4RecConfig, n_items: int, batch_size: int):
        self.seqs = [s for s in seqs if len(s) > 0]
        self.lengths = np.fromiter((min(len(s), cfg.max_len) for s in self.seqs), dtype=np.int64, count=len(self.seqs))
        self.cfg, self.n_items, self.batch_size = cfg, n_items, batch_size
        counts = np.bincount(np.concatenate(self.seqs), minlength=n_items + 1)[1:].astype(np.float64)
        q = (counts + 1.0) ** 0.75  # popularity-smoothed sampling for sampled softmax
        self.q = torch.from_numpy(q / q.sum())

    def n_batches(self) -> int:
        return -(-len(self.seqs) // self.batch_size)

    def _window(self, s: np.ndarray, generator: torch.Generator) -> np.ndarray:
        T = self.cfg.max_len
        if len(s) <= T or self.cfg.window == "last":
            return s[-T:]
        end = int(torch.randint(T, len(s) + 1, (1,), generator=generator))  # a random slice of a long history
        return s[end - T : end]

    def _order(self, generator: torch.Generator) -> list[np.ndarray]:
        """This epoch's batches of sequence indices. With `length_buckets`, a shuffled pool of up to
        BUCKET_POOL batches is sorted by length before it is cut, and the batches are shuffled again:
        each batch is padded only to its own longest sequence, so short histories cost little."""
        order = torch.randperm(len(self.seqs), generator=generator).numpy()
        bs = self.batch_size
        if not self.cfg.length_buckets:
            return [order[i : i + bs] for i in range(0, len(order), bs)]
        pool = bs * self.BUCKET_POOL
        out = []
        for p in range(0, len(order), pool):
            chunk = order[p : p + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]  # ties keep the random order
            out += [chunk[i : i + bs] for i in range(0, len(chunk), bs)]
        return [out[k] for k in torch.randperm(len(out), generator=generator).tolist()]

    def batches(self, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        batches = map(lambda idx: self._batch(idx, generator), self._order(generator))
        if not self.cfg.token_weighted:
            yield from batches
            return
        # Every masked item of the epoch weighs alike, however the batches were cut: a batch's mean loss
        # is scaled by its masked items over the expected masked items per batch of the epoch.
        mean = self.expected_masked() / self.n_batches()
        for b in batches:
            yield {**b, "loss_scale": torch.tensor(float((b["labels"] != 0).sum()) / mean)}

    def expected_masked(self) -> float:
        """Expected masked positions in an epoch under `mask_items`' rules: a sequence of L >= 2 items draws
        Binomial(L, p), bumped to 1 when none and cut to L - 1 when all; one item, or the last-item task, is 1."""
        L, p, last = self.lengths.astype(np.float64), self.cfg.mask_prob, self.cfg.last_item_prob
        drawn = np.where(L >= 2, L * p + (1 - p) ** L - p**L, 1.0)
        return float((last + (1 - last) * drawn).sum())

    def _batch(self, idx: np.ndarray, generator: torch.Generator) -> dict[str, torch.Tensor]:
        rows = [self._window(self.seqs[j], generator) for j in idx]
        seqs = torch.from_numpy(left_pad(rows, max(len(r) for r in rows)))  # (B, T <= max_len)
        inputs, labels = mask_items(seqs, self.cfg.mask_prob, self.n_items + 1, generator, self.cfg.last_item_prob)
        batch = {"inputs": inputs, "labels": labels}
        if self.cfg.negatives:
            neg = torch.multinomial(self.q, self.cfg.negatives, replacement=True, generator=generator)
            batch["negatives"] = neg + 1
            batch["neg_logq"] = torch.log(self.q[neg]).float()
        return batch


# ---- scoring ----------------------------------------------------------------------------------------------
def score_function(model: nn.Module, data: PreparedData, stage: str) -> Callable[[np.ndarray], torch.Tensor]:
    """users (b,) -> (b, n_items) scores for predicting `stage`'s target."""
    if isinstance(model, nn.Module) and hasattr(model, "score_users"):  # MF: a vector per user
        return lambda users: model.score_users(torch.from_numpy(users).to(_device(model))).cpu()
    hist = data.histories(stage)
    return lambda users: model(query_inputs([hist[u] for u in users], model).to(_device(model)))[0].cpu()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def query_inputs(histories: list[np.ndarray], model: nn.Module) -> torch.Tensor:
    """(b, T) model inputs: the newest T - 1 items of each history, then [MASK]; T = max_len, or less when
    every history is shorter (the columns left out would be padding only, which attention ignores)."""
    width = min(model.cfg.max_len, max((len(h) for h in histories), default=0) + 1)
    return append_mask(torch.from_numpy(left_pad(histories, width)), model.mask_token)


def evaluate(model: nn.Module, data: PreparedData, stage: str, batch_size: int = 512) -> dict[str, float]:
    targets = data.targets(stage)
    users = np.flatnonzero(targets >= 0)
    history = history_matrix(data.histories(stage), data.n_items)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = evaluate_scores(score_function(model, data, stage), users, targets[users], history, data.n_items,
                              batch_size=batch_size)
    model.train(was_training)
    return out


def evaluate_popularity(data: PreparedData, stage: str) -> dict[str, float]:
    pop = popularity_scores(data.train_matrix).float()
    targets = data.targets(stage)
    users = np.flatnonzero(targets >= 0)
    history = history_matrix(data.histories(stage), data.n_items)
    return evaluate_scores(lambda u: pop.expand(len(u), -1), users, targets[users], history, data.n_items)


def embeddings(model: nn.Module, data: PreparedData, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(item vectors (n_items, d'), user vectors (n_users, d') from each user's full history)."""
    model.eval()
    with torch.no_grad():
        items = model.item_embeddings().numpy()
        if hasattr(model, "score_users"):
            users = model.user_embeddings(torch.arange(data.n_users)).numpy()
        else:
            full, parts = data.full_sequences(), []
            for i in range(0, data.n_users, batch_size):
                parts.append(model.user_embeddings(query_inputs(full[i : i + batch_size], model)).numpy())
            users = np.concatenate(parts) if parts else np.zeros((0, items.shape[1]), np.float32)
    return items, users


# ---- the stage ----------------------------------------------------------------------------------------------
def model_config(cfg: PretrainConfig) -> MFConfig | BERT4RecConfig:
    if cfg.model not in ("mf", "bert4rec"):
        raise ValueError(f"unknown model {cfg.model!r}; known: ['bert4rec', 'mf']")
    return cfg.mf if cfg.model == "mf" else cfg.bert4rec


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


CLOSED_FORM = ("svd", "als")  # MF solvers that solve, not train by gradient descent


def closed_form_candidates(mcfg: MFConfig, free_dim: bool) -> list[dict]:
    """The solver settings a closed-form fit tries, in order: svd has one; als the grid (recipes.ALS_GRID)
    over the settings left unset in the config (`free_dim`: the factors too)."""
    if mcfg.loss == "svd":
        return [{}]
    grid = {k: (getattr(mcfg, k),) if getattr(mcfg, k) is not None else v for k, v in ALS_GRID.items()
            if k != "factors"}
    dims = ALS_GRID["factors"] if free_dim else (mcfg.dim,)
    return [{"factors": f, "regularization": r, "alpha": a}
            for f in dims for r in grid["regularization"] for a in grid["alpha"]]


def solve(model: nn.Module, mcfg: MFConfig, matrix: sp.csr_matrix, params: dict, seed: int) -> float:
    """One closed-form solve of MF on `matrix` with `params` (from closed_form_candidates)."""
    if mcfg.loss == "svd":
        return model.fit_svd(matrix, seed=seed)
    return model.fit_als(matrix, regularization=params["regularization"], alpha=params["alpha"],
                         iterations=mcfg.iterations, seed=seed)


def fit_closed_form(build: Callable[[MFConfig], nn.Module], mcfg: MFConfig, data: PreparedData, tcfg: TrainConfig,
                    validate: Callable[[nn.Module], dict], checkpoint_dir: Path, free_dim: bool = False,
                    on_epoch: Callable[[int, dict], None] | None = None):
    """MF's closed-form solvers (svd, als): each candidate setting solved on the training matrix (a model
    built for it by `build(cfg)`) and validated; the best is kept. Reported as a fit with one "epoch" per
    candidate (the loss: svd's relative squared residual, 0 for als).
    Returns (the chosen model, its config, the fit, the chosen setting)."""
    t0 = time.perf_counter()
    best, history = None, []
    for i, params in enumerate(closed_form_candidates(mcfg, free_dim), 1):
        cfg = dataclasses.replace(mcfg, dim=params.get("factors", mcfg.dim))
        model = build(cfg)
        loss = solve(model, cfg, data.train_matrix, params, tcfg.seed)
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
    fit_result = FitResult(best_epoch=i, best_metrics=metrics, epochs_run=len(history), stopped="closed_form",
                           train_seconds=time.perf_counter() - t0, history=history, best_checkpoint=path)
    return model, cfg, fit_result, params


def refit_loop(model: nn.Module, name: str, mcfg, data: PreparedData, tcfg: TrainConfig, chosen: FitResult,
               share: float, seconds_left: float | None, checkpoint_dir: Path, fingerprint: dict,
               resume: str = "match") -> FitResult:
    """Continue training the chosen model on train + validation (each user's validation item appended)
    for `share / (1 - share)` of its epochs, from the learning rate it was chosen at down to zero, with no
    validation (the validation items are now training data). Under a budget, within `seconds_left`."""
    epochs = max(1, round(share / (1 - share) * chosen.best_epoch))
    lr = next((h["lr"] for h in chosen.history if h["epoch"] == chosen.best_epoch), tcfg.lr)
    rcfg = dataclasses.replace(tcfg, epochs=epochs, lr=lr, warmup_steps=0, schedule="linear", seed=tcfg.seed + 1,
                               max_minutes=None if seconds_left is None else max(seconds_left, 1.0) / 60)
    both = dataclasses.replace(data, train_seqs=data.histories("test"), train_matrix=train_valid_matrix(data))
    task = make_task(name, mcfg, both, rcfg)
    return fit(model, task, rcfg, None, checkpoint_dir=checkpoint_dir, fingerprint={**fingerprint, "refit": epochs},
               resume=resume)


def train_valid_matrix(data: PreparedData) -> sp.csr_matrix:
    """The training matrix with each user's validation item added (weight 1): what a refit learns from."""
    users = np.flatnonzero(data.valid >= 0)
    extra = sp.csr_matrix((np.ones(len(users), np.float32), (users, data.valid[users])), shape=data.train_matrix.shape)
    return (data.train_matrix + extra).tocsr()


def make_task(name: str, mcfg, data: PreparedData, tcfg: TrainConfig):
    if name == "mf":
        if mcfg.loss in CLOSED_FORM:
            return None  # solved, not trained in batches: fit_closed_form
        if mcfg.loss == "softmax":
            return MFSoftmaxTask(data.train_matrix, tcfg.batch_size)
        if mcfg.loss == "bpr":
            return MFBPRTask(data.train_matrix, tcfg.batch_size, data.n_items)
        raise ValueError(f"unknown MF loss {mcfg.loss!r}; use svd, als, softmax or bpr")
    return SequenceTask(data.train_seqs, mcfg, data.n_items, tcfg.batch_size)


def training_curve(history: list[dict], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(7, 4))
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
    fit: FitResult
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
    raw id, new ones fresh); the run then gets `cfg.warm_epoch_share` of the epoch budget."""
    from recsys_pretrain.tracking import NullTracker, git_commit, redact_uri

    tracker = tracker or NullTracker()
    data = load_prepared(prepared)
    mcfg, recipe = resolve_recipe(cfg.model, model_config(cfg), data.train_seqs)
    for key, rule in recipe.items():
        print(f"{cfg.model}.{key}: {rule}", file=sys.stderr)
    tcfg = mcfg.train
    torch.manual_seed(tcfg.seed)
    model = build_model(cfg.model, mcfg, data.n_users, data.n_items)
    warm = None
    task = make_task(cfg.model, mcfg, data, tcfg)  # None: mf's closed-form solver (only the epochs change below)
    if init_from is not None and task is None:
        log.info("mf's svd solver is closed form: nothing to warm-start from %s", init_from)
    elif init_from is not None:
        warm = warm_start(model, cfg.model, data.vocab, init_from)
        share = cfg.warm_epoch_share
        tcfg = dataclasses.replace(tcfg, epochs=max(1, round(tcfg.epochs * share)),
                                   eval_every=min(tcfg.eval_every, max(1, round(tcfg.epochs * share))),
                                   warmup_steps=round(tcfg.warmup_steps * share))
    out_dir = Path(out_dir)
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
        tracker.log_params(flatten({"model": cfg.model, cfg.model: dataclasses.asdict(mcfg),
                                    **({"warm_start": {**warm, "epochs": tcfg.epochs}} if warm else {}),
                                    **({"recipe": recipe} if recipe else {}),
                                    "data": {"users": data.n_users, "items": data.n_items,
                                             "interactions": data.meta.get("interactions")}}))
        tracker.log_input(name=data.name, digest=data.meta.get("events_sha256", "")[:32],
                          counts={"users": data.n_users, "items": data.n_items,
                                  "interactions": int(data.meta.get("interactions", 0)),
                                  "train_interactions": int(data.meta["loo"]["train_interactions"])},
                          source=str(data.path))

        def log_epoch(epoch: int, row: dict) -> None:
            tracker.log_metrics({k.replace("val_", "val/").replace("train_loss", "train/loss"): v
                                 for k, v in row.items() if k != "epoch"}, step=epoch)
            if on_epoch is not None:
                on_epoch(epoch, row)

        validate = lambda m: evaluate(m, data, "valid", tcfg.eval_batch_size)  # noqa: E731
        chosen = None
        if task is None:  # mf's closed-form solvers
            model, mcfg, result, chosen = fit_closed_form(
                lambda c: build_model(cfg.model, c, data.n_users, data.n_items), mcfg, data, tcfg, validate,
                out_dir / "checkpoints", free_dim=model_config(cfg).dim is None, on_epoch=log_epoch)
            tracker.log_params(flatten({"chosen": chosen}))
        else:  # under a budget with a refit to come, the chosen model gets (1 - refit_share) of it
            budget = tcfg.max_minutes
            main = tcfg if not (cfg.refit and budget) else dataclasses.replace(
                tcfg, max_minutes=budget * (1 - cfg.refit_share))
            result = fit(model, task, main, validate, checkpoint_dir=out_dir / "checkpoints", on_epoch=log_epoch,
                         fingerprint=fingerprint, resume=cfg.resume)
        valid = evaluate(model, data, "valid", tcfg.eval_batch_size)
        test = evaluate(model, data, "test", tcfg.eval_batch_size)
        test_no_refit, refit_seconds = None, 0.0
        if cfg.refit:  # learn from the validation items too, then test once more
            t1 = time.perf_counter()
            if chosen is not None:  # the chosen setting solved again
                solve(model, mcfg, train_valid_matrix(data), chosen, tcfg.seed)
            else:
                left = None if not tcfg.max_minutes else tcfg.max_minutes * 60 - result.train_seconds
                refit_loop(model, cfg.model, mcfg, data, tcfg, result, cfg.refit_share, left,
                           out_dir / "checkpoints" / "refit", fingerprint, cfg.resume)
            refit_seconds = time.perf_counter() - t1
            test_no_refit, test = test, evaluate(model, data, "test", tcfg.eval_batch_size)
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
        fig = training_curve(result.history, f"{cfg.model} on {data.name}")
        tracker.log_figure(fig, "training_curve.png")
        import matplotlib.pyplot as plt

        plt.close(fig)
        tracker.log_dict({**dataclasses.asdict(cfg), "tracking_uri": redact_uri(cfg.tracking_uri)}, "config.json")
        tracker.log_dict({"valid": valid, "test": test, "test_no_refit": test_no_refit, "popularity_test": pop,
                          "history": result.history}, "metrics.json")
        tracker.log_model_dir(model_dir, name="model_dir")  # what `evaluate RUN_ID` and serving fetch
        if result.best_checkpoint is not None and result.best_checkpoint.exists():
            tracker.log_artifact(result.best_checkpoint, "checkpoints")
        model_uri = tracker.log_recommender(model_dir, name="model")
    return PretrainResult(run_id=run_id, model_dir=model_dir, fit=result, valid=valid, test=test,
                          popularity_test=pop, seconds=time.perf_counter() - t0, model_uri=model_uri,
                          warm_start=warm, test_no_refit=test_no_refit, refit_seconds=refit_seconds)
