"""Fine-tuning on click and purchase labels: an ESMM ranker over pretrained (or random) embeddings.

Three initialisations share one architecture and one training loop: `frozen` (pretrained embeddings
fixed, only the towers learn), `finetuned` (pretrained embeddings learn at a lower rate) and `random`
(from scratch). The label-efficiency benchmark trains each on a fraction of the labels.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from recsys_pretrain import schema as S
from recsys_pretrain.config import FinetuneConfig, PrepareConfig
from recsys_pretrain.data.labels import FEATURES, features
from recsys_pretrain.data.prepare import prepare
from recsys_pretrain.io import atomic_dir
from recsys_pretrain.metrics import binary_metrics
from recsys_pretrain.models.heads import ESMMRanker
from recsys_pretrain.pyfunc import log_ranker
from recsys_pretrain.ranker import RANKER_META, predict_pairs
from recsys_pretrain.tracking import NullTracker
from recsys_pretrain.train.loop import FitResult, fit
from recsys_pretrain.train.pretrain import pretrain
from recsys_pretrain.vocab import Vocab

INITS = ("frozen", "finetuned", "random")


@dataclass
class LabelSet:
    users: np.ndarray
    items: np.ndarray
    feats: np.ndarray  # (n, len(FEATURES))
    y_click: np.ndarray
    y_purchase: np.ndarray

    @classmethod
    def of(cls, df: pl.DataFrame, feats: dict) -> LabelSet:
        return cls(df[S.USER_IDX].to_numpy().astype(np.int64), df[S.ITEM_IDX].to_numpy().astype(np.int64),
                   features(df, feats), df["y_click"].to_numpy(), df["y_purchase"].to_numpy())

    def __len__(self) -> int:
        return len(self.users)


class LabelTask:
    def __init__(self, rows: LabelSet, batch_size: int):
        self.rows, self.batch_size = rows, batch_size

    def n_batches(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def batches(self, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.randperm(len(self.rows), generator=generator).numpy()
        r = self.rows
        for i in range(0, len(order), self.batch_size):
            j = order[i : i + self.batch_size]
            yield {"users": torch.from_numpy(r.users[j]), "items": torch.from_numpy(r.items[j]),
                   "feats": torch.from_numpy(r.feats[j]), "y_click": torch.from_numpy(r.y_click[j]),
                   "y_purchase": torch.from_numpy(r.y_purchase[j])}


def predict(model: ESMMRanker, rows: LabelSet, batch_size: int = 8192) -> dict[str, np.ndarray]:
    return predict_pairs(model, rows.users, rows.items, rows.feats, batch_size)


def evaluate_labels(model: ESMMRanker, rows: LabelSet) -> dict[str, float]:
    """Click: pCTR vs clicks; purchase: pCTCVR vs purchases (all rows); cvr: pCVR on clicked rows."""
    p = predict(model, rows)
    out = {f"click_{k}": v for k, v in binary_metrics(rows.y_click, p["ctr"], rows.users).items()}
    out.update({f"purchase_{k}": v for k, v in binary_metrics(rows.y_purchase, p["ctcvr"], rows.users).items()})
    clicked = rows.y_click == 1
    if clicked.any() and 0 < rows.y_purchase[clicked].mean() < 1:
        out["cvr_auc"] = binary_metrics(rows.y_purchase[clicked], p["cvr"][clicked])["auc"]
    return out


def load_label_data(label_dir: str | Path) -> tuple[pl.DataFrame, dict]:
    label_dir = Path(label_dir)
    labels = pl.read_parquet(label_dir / "labels.parquet")
    feats = dict(np.load(label_dir / "features.npz"))
    return labels, feats


def split_finetune(labels: pl.DataFrame, cfg: FinetuneConfig, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Fine-tuning rows -> (train: a `label_fraction` sample, valid: a fixed `valid_share` hold-out)."""
    ft = labels.filter(pl.col("split") == "finetune").with_row_index("_r")
    rng = np.random.default_rng(1234)  # the validation hold-out is the same for every fraction and seed
    is_valid = rng.random(ft.height) < cfg.valid_share
    valid, train = ft.filter(pl.Series(is_valid)), ft.filter(pl.Series(~is_valid))
    if cfg.label_fraction < 1.0:
        keep = np.random.default_rng(seed).random(train.height) < cfg.label_fraction
        train = train.filter(pl.Series(keep))
    return train.drop("_r"), valid.drop("_r")


@dataclass
class FinetuneResult:
    init: str
    label_fraction: float
    train_rows: int
    fit: FitResult
    test: dict[str, float]
    ranker_dir: Path
    run_id: str | None
    seconds: float
    model_uri: str | None = None  # the logged pyfunc ranker, for the registry


def finetune(label_dir: str | Path, pretrained_dir: str | Path, cfg: FinetuneConfig, out_dir: str | Path,
             tracker=None, parent_run_id: str | None = None, run_name: str | None = None) -> FinetuneResult:
    """Train the ranker with `cfg.init` on `cfg.label_fraction` of the fine-tuning labels; test on [T2, end)."""
    if cfg.init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {cfg.init!r}")
    if not 0.0 < cfg.label_fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {cfg.label_fraction}")
    t0 = time.perf_counter()
    tracker = tracker or NullTracker()
    labels, feats = load_label_data(label_dir)
    pretrained_dir = Path(pretrained_dir)
    vocab = Vocab.load(pretrained_dir / "vocab.json")
    user_vecs = torch.from_numpy(np.load(pretrained_dir / "user_embeddings.npy"))
    item_vecs = torch.from_numpy(np.load(pretrained_dir / "item_embeddings.npy"))
    seed = cfg.train.seed
    torch.manual_seed(seed)
    model = ESMMRanker(vocab.n_users, vocab.n_items, user_vecs.shape[1], len(FEATURES), cfg.hidden)
    groups = None
    if cfg.init != "random":
        model.load_pretrained(user_vecs, item_vecs)
    embeddings = [model.user.weight, model.item.weight]
    heads = [p for n, p in model.named_parameters() if not n.startswith(("user.", "item."))]
    if cfg.init == "frozen":
        for p in embeddings:
            p.requires_grad_(False)
        groups = [{"params": heads}]
    elif cfg.init == "finetuned":
        groups = [{"params": heads}, {"params": embeddings, "lr": cfg.train.lr * cfg.pretrained_lr_scale}]

    train_df, valid_df = split_finetune(labels, cfg, seed)
    train, valid = LabelSet.of(train_df, feats), LabelSet.of(valid_df, feats)
    test = LabelSet.of(labels.filter(pl.col("split") == "test"), feats)
    if len(train) == 0:
        raise ValueError(f"no training labels at label_fraction={cfg.label_fraction}")
    out_dir = Path(out_dir)
    name = run_name or f"finetune-{cfg.init}-{cfg.label_fraction:g}-seed{seed}"
    with tracker.start_run(f"{json.loads((Path(label_dir) / 'labels_report.json').read_text())['dataset']}-finetune",
                           name, tags={"stage": "finetune", "init": cfg.init,
                                       "pretrained": str(pretrained_dir)},
                           parent_run_id=parent_run_id,
                           description=f"ESMM ranker, {cfg.init} initialisation, {cfg.label_fraction:.0%} of labels"
                           ) as run_id:
        tracker.log_params({"finetune": dataclasses.asdict(cfg), "train_rows": len(train)})

        def log_epoch(epoch: int, row: dict) -> None:
            tracker.log_metrics({k.replace("val_", "valid/").replace("train_loss", "train/loss"): v
                                 for k, v in row.items() if k != "epoch"}, step=epoch)

        result = fit(model, LabelTask(train, cfg.train.batch_size), cfg.train,
                     lambda m: {"auc": evaluate_labels(m, valid)["click_auc"]}, on_epoch=log_epoch,
                     monitor="auc", param_groups=groups)
        metrics = evaluate_labels(model, test)
        tracker.log_metrics({f"test/{k}": v for k, v in metrics.items()}, step=result.epochs_run)
        ranker_dir = save_ranker(out_dir / "ranker", model, cfg, pretrained_dir, Path(label_dir))
        tracker.log_model_dir(ranker_dir, name="ranker_dir")
        model_uri = log_ranker(tracker, ranker_dir, name="ranker")
    return FinetuneResult(cfg.init, cfg.label_fraction, len(train), result, metrics, ranker_dir, run_id,
                          time.perf_counter() - t0, model_uri)


def save_ranker(path: Path, model: ESMMRanker, cfg: FinetuneConfig, pretrained_dir: Path, label_dir: Path) -> Path:
    with atomic_dir(path) as stage:
        torch.save(model.state_dict(), stage / "weights.pt")
        (stage / RANKER_META).write_text(json.dumps(
            {"dim": model.user.weight.shape[1], "hidden": cfg.hidden, "n_features": len(FEATURES),
             "features": list(FEATURES), "init": cfg.init, "pretrained": str(pretrained_dir)}, indent=2))
        shutil.copyfile(pretrained_dir / "vocab.json", stage / "vocab.json")
        shutil.copyfile(label_dir / "features.npz", stage / "features.npz")
    return path


def pretrain_before_cutoff(label_dir: str | Path, pretrain_cfg, out_dir: str | Path, tracker=None,
                           parent_run_id: str | None = None):
    """Prepare and pretrain on the events before T1 that `build_labels` set aside: the only pretraining
    the fine-tuning labels may use. Returns the PretrainResult."""
    out_dir = Path(out_dir)
    prepare(Path(label_dir) / "pretrain", out_dir / "prepared", PrepareConfig())
    return pretrain(out_dir / "prepared", pretrain_cfg, out_dir / "run", tracker=tracker,
                    parent_run_id=parent_run_id)


def check_pretrained_before_labels(pretrained_dir: str | Path) -> None:
    """Refuse a pretrained model whose training data may overlap the label window (a leak)."""
    meta = json.loads((Path(pretrained_dir) / "model.json").read_text())
    if not str(meta.get("dataset", "")).endswith("-before-T1"):
        raise ValueError(f"{pretrained_dir} was pretrained on {meta.get('dataset')!r}, not on the events before T1 "
                         "that `build_labels` sets aside: its embeddings may have seen the label window")
