"""Tiny training runs for tests/test_distributed.py, in one process or as ranks under torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_fit.py --out DIR

Each case (a tiny MF with the softmax loss, a tiny BERT4Rec with full and with sampled softmax) trains with
`recsys_pretrain.train.loop.fit` on in-memory data; every rank writes its final weights and its FitResult
to DIR/<case>/, and marks which ranks wrote checkpoints or saw `on_epoch` (the test checks rank 1 did not).
`--kill CASE:K` ends the job abruptly right after epoch K's checkpoint of CASE (os._exit on rank 0; torchrun
then stops the other rank); run again, CASE resumes from that checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the project importable


def api():
    """Where models, their training tasks and configs live: the one place to change when they move.
    Returns (model(name, cfg) -> nn.Module, task(name, cfg, seqs, matrix) -> Task, MFConfig, BERT4RecConfig,
    TrainConfig)."""
    from types import SimpleNamespace

    from recsys_pretrain.models import MODELS
    from recsys_pretrain.models.bert4rec import BERT4RecConfig
    from recsys_pretrain.models.mf import MFConfig
    from recsys_pretrain.train_config import TrainConfig

    def model(name, cfg):
        return MODELS[name].build(cfg, N_USERS, N_ITEMS)

    def task(name, cfg, seqs, matrix):
        data = SimpleNamespace(n_users=N_USERS, n_items=N_ITEMS, train_seqs=seqs, train_matrix=matrix)
        return MODELS[name].task(cfg, data)

    return model, task, MFConfig, BERT4RecConfig, TrainConfig


N_USERS, N_ITEMS = 40, 30
CASES = ("mf", "bert4rec", "bert4rec_sampled")


def data() -> tuple[list[np.ndarray], sp.csr_matrix]:
    """Histories of 1-12 items (so length buckets matter) and their (n_users, n_items + 1) count matrix."""
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, N_ITEMS + 1, int(rng.integers(1, 13))) for _ in range(N_USERS)]
    rows = np.repeat(np.arange(N_USERS), [len(s) for s in seqs])
    m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, np.concatenate(seqs))), shape=(N_USERS, N_ITEMS + 1))
    return seqs, m


def config(case: str, epochs: int):
    _, _, MFConfig, BERT4RecConfig, TrainConfig = api()
    # batch sizes that do not divide the users: uneven shards, a short last batch
    train = TrainConfig(epochs=epochs, batch_size=7, lr=1e-2, weight_decay=0.01, warmup_steps=2, schedule="cosine",
                        grad_clip=1.0, patience=100, eval_every=1, progress=False, seed=3)
    if case.startswith("mf"):  # mf_budget: a wall-clock budget that runs out at the first step
        if case == "mf_budget":
            train = dataclasses.replace(train, max_minutes=1e-9)
        return "mf", MFConfig(loss="softmax", dim=8, init_std=0.1, train=train)
    # no dropout: its masks are drawn per rank, so only a dropout-free model takes the very same steps
    return "bert4rec", BERT4RecConfig(dim=16, max_len=8, n_layers=1, n_heads=2, dropout=0.0, mask_prob=0.3,
                                      negatives=8 if case == "bert4rec_sampled" else 0,
                                      train=dataclasses.replace(train, batch_size=6))


def validate(model: torch.nn.Module) -> dict[str, float]:
    """A deterministic figure of the weights in (0, 1], so that best epochs are chosen (and broadcast) as in
    real runs."""
    with torch.no_grad():
        return {"ndcg_at_10": 1 / (1 + float(sum((p.double() ** 2).sum() for p in model.parameters())))}


def run(case: str, epochs: int, ckpt: Path | None, on_epoch=None):
    """(model, FitResult) of one case; in one process this is the world-size-1 reference."""
    from recsys_pretrain.train.loop import fit

    make_model, make_task, *_ = api()
    name, cfg = config(case, epochs)
    seqs, matrix = data()
    torch.manual_seed(0)
    model = make_model(name, cfg)
    res = fit(model, make_task(name, cfg, seqs, matrix), cfg.train, validate, checkpoint_dir=ckpt,
              on_epoch=on_epoch, fingerprint={"case": case})
    return model, res


def main(argv: list[str] | None = None) -> int:
    import recsys_pretrain.train.loop as loop
    from recsys_pretrain import distributed as dist

    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--kill", default=None, help="CASE:EPOCH")
    args = p.parse_args(argv)
    kill_case, _, kill_epoch = (args.kill or ":").partition(":")
    dist.init_from_env()
    rank = dist.rank()
    save = loop.save_checkpoint

    def marked_save(path: Path, obj: dict) -> None:  # who writes checkpoints
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / f"writer-rank{rank}").touch()
        save(path, obj)

    loop.save_checkpoint = marked_save
    for case in args.cases.split(","):
        out = args.out / case
        out.mkdir(parents=True, exist_ok=True)

        def on_epoch(epoch, row, out=out, case=case):
            (out / f"on_epoch-rank{rank}").touch()
            if case == kill_case and str(epoch) == kill_epoch:
                os._exit(17)  # killed: no cleanup, no further collective

        model, res = run(case, args.epochs, out / "ckpt", on_epoch)
        torch.save(model.state_dict(), out / f"final-rank{rank}.pt")
        (out / f"result-rank{rank}.json").write_text(json.dumps(
            {"world": dist.world_size(), **{k: v for k, v in dataclasses.asdict(res).items()
                                            if k != "best_checkpoint"}}, default=str))
    dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
