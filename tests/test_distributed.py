"""Data-parallel training (recsys_pretrain/distributed.py, the loop's torchrun path).

Two ranks under `torchrun --standalone --nproc_per_node 2` (gloo, CPU) train tiny models with the one loop
(tests/distributed_fit.py); the same global batches in one process must give the same weights. A run killed
after its first checkpoint resumes, at world size 2 and at world size 1, and only rank 0 writes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recsys_pretrain import distributed as dist
from recsys_pretrain.train.loop import LoopState, epoch_line
from tests.distributed_fit import CASES, run

SCRIPT = Path(__file__).with_name("distributed_fit.py")
EPOCHS = 3
ATOL = 1e-5


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-rank job training every case for EPOCHS epochs, except that `bert4rec` is killed right after its
    first epoch's checkpoint; then a second job that resumes it. (out dir, the first job, the second job)."""
    out = tmp_path_factory.mktemp("ddp")
    first = _torchrun("--out", str(out), "--epochs", str(EPOCHS), "--cases", "mf,mf_budget,bert4rec_sampled,bert4rec",
                      "--kill", "bert4rec:1")
    shutil.copytree(out / "bert4rec" / "ckpt", out / "killed-ckpt")  # for a resume at world size 1
    second = _torchrun("--out", str(out), "--epochs", str(EPOCHS), "--cases", "bert4rec")
    return out, first, second


def _assert_close(one: dict, two: dict, case: str) -> None:
    for k, a in one.items():
        b = two[k]
        if k.endswith("qkv.bias"):
            # The key bias has a zero gradient in exact arithmetic (softmax ignores a shift shared by every
            # key), so AdamW's normalised step turns rounding noise into lr-sized moves there: a looser check.
            d = a.shape[0] // 3
            assert torch.allclose(a[d : 2 * d], b[d : 2 * d], atol=1e-3), (case, k)
            a, b = torch.cat([a[:d], a[2 * d :]]), torch.cat([b[:d], b[2 * d :]])
        assert torch.allclose(a, b, atol=ATOL), (case, k, float((a - b).abs().max()))


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_take_the_steps_of_one_process(two_ranks, case):
    out, first, second = two_ranks
    assert first.returncode != 0 and second.returncode == 0, second.stderr[-3000:]
    model, res = run(case, EPOCHS, None)
    w = [torch.load(out / case / f"final-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])  # DDP keeps the ranks' weights identical
    _assert_close(model.state_dict(), w[0], case)
    two = json.loads((out / case / "result-rank0.json").read_text())
    assert two["world"] == 2 and two["epochs_run"] == res.epochs_run == EPOCHS
    assert two["best_epoch"] == res.best_epoch and two == json.loads((out / case / "result-rank1.json").read_text())
    for h1, h2 in zip(res.history, two["history"], strict=True):  # the global batches' mean loss
        assert h1["train_loss"] == pytest.approx(h2["train_loss"], rel=1e-5, abs=1e-6)
        assert h1["lr"] == pytest.approx(h2["lr"])
    # only rank 0 writes checkpoints and sees on_epoch
    assert (out / case / "ckpt" / "writer-rank0").exists() and (out / case / "ckpt" / "last.pt").exists()
    assert not list(out.glob("**/*rank1")) and (out / case / "on_epoch-rank0").exists()


def test_a_budget_stops_every_rank_at_the_same_step(two_ranks):
    out = two_ranks[0] / "mf_budget"
    results = [json.loads((out / f"result-rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["stopped"] == "budget" and r["epochs_run"] == 1 for r in results)
    w = [torch.load(out / f"final-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])


def test_a_killed_two_rank_run_resumes_at_any_world_size(two_ranks):
    out, first, second = two_ranks
    killed = torch.load(out / "killed-ckpt" / "last.pt", weights_only=True)
    assert killed["state"]["epoch"] == 1
    assert "resuming from" in second.stderr and "after epoch 1" in second.stderr
    # one line per epoch, printed by rank 0 alone: epoch 1 of each case in the first job, 2 and 3 in the second
    epochs = [[ln.split()[1] for ln in job.stderr.splitlines() if ln.startswith("epoch ")] for job in (first, second)]
    assert epochs == [["1/3", "2/3", "3/3", "1/3", "1/3", "2/3", "3/3", "1/3"], ["2/3", "3/3"]]
    straight, _ = run("bert4rec", EPOCHS, None)
    resumed2 = torch.load(out / "bert4rec" / "final-rank0.pt", weights_only=True)
    _assert_close(straight.state_dict(), resumed2, "resumed at world size 2")
    resumed1, res = run("bert4rec", EPOCHS, out / "killed-ckpt")  # the 2-rank checkpoint, one process
    assert res.epochs_run == EPOCHS and len(res.history) == EPOCHS
    _assert_close(straight.state_dict(), resumed1.state_dict(), "resumed at world size 1")


# ---- the helpers, in one process -------------------------------------------------------------------------------
def test_shard_cuts_examples_and_keeps_shared_tensors_whole():
    batch = {"inputs": torch.arange(14).view(7, 2), "labels": torch.arange(7), "negatives": torch.arange(7),
             "neg_logq": torch.zeros(7), "loss_scale": torch.tensor(1.5)}
    parts = [dist.shard(batch, r, 3) for r in range(3)]
    assert [len(p["labels"]) for p in parts] == [3, 2, 2]
    assert torch.equal(torch.cat([p["inputs"] for p in parts]), batch["inputs"])
    assert all(torch.equal(p["negatives"], batch["negatives"]) and p["loss_scale"] == 1.5 for p in parts)
    assert len(dist.shard({"users": torch.arange(1)}, 1, 2)["users"]) == 0  # a rank past the end: nothing
    with pytest.raises(ValueError, match="one first dimension"):
        dist.shard({"users": torch.arange(3), "pos": torch.arange(4)}, 0, 2)


def test_loss_count_follows_each_task_s_denominator():
    assert dist.loss_count({"inputs": torch.ones(2, 3), "labels": torch.tensor([[0, 4, 0], [1, 2, 0]])}) == 3
    assert dist.loss_count({"users": torch.arange(2), "targets": torch.tensor([[2.0, 0.0], [1.0, 1.0]])}) == 4
    assert dist.loss_count({"users": torch.arange(5), "pos": torch.arange(5), "neg": torch.arange(5)}) == 5


def test_part_weighs_each_rank_by_its_share_of_the_loss():
    batch = {"users": torch.arange(3), "targets": torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, 4.0]])}
    (m0, s0), (m1, s1) = dist.part(batch, 0, 2), dist.part(batch, 1, 2)
    assert m0["users"].tolist() == [0, 1] and m1["users"].tolist() == [2]
    assert s0 == s1 == 2 * 4 / 8  # each rank holds 4 of the batch's 8 target weights
    one = {"users": torch.arange(1), "pos": torch.arange(1), "neg": torch.arange(1)}
    mine, scale = dist.part(one, 1, 2)  # a rank with no example computes rank 0's, weighed 0
    assert mine["users"].tolist() == [0] and scale == 0.0


def test_single_process_helpers_are_the_identity():
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert dist.all_reduce_mean({"a": 2.0}) == {"a": 2.0} and dist.broadcast_object([1]) == [1]
    dist.barrier()


def test_launch_runs_the_cli_under_torchrun(monkeypatch):
    seen = {}

    def fake_run(cmd, check):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 3)

    monkeypatch.setattr(dist.subprocess, "run", fake_run)
    assert dist.launch(["pretrain", "--model", "mf"], 4) == 3
    assert seen["cmd"] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                           "-m", "recsys_pretrain.cli", "pretrain", "--model", "mf"]


def test_loop_state_keeps_the_checkpoint_layout_and_prints_a_line_per_epoch():
    s = LoopState(horizon=5)
    assert "stopped" not in s.to_dict() and len(s.to_dict()) == 8
    s.stopped = "budget"
    assert LoopState.from_dict(s.to_dict(), horizon=9) == s
    assert LoopState.from_dict({k: v for k, v in s.to_dict().items() if k != "horizon"}, horizon=9).horizon == 9
    line = epoch_line({"epoch": 2, "train_loss": 1.23456, "lr": 1e-3, "val_ndcg_at_10": 0.1, "elapsed_s": 3.21}, 10)
    assert line == "epoch 2/10  train_loss 1.2346  val_ndcg_at_10 0.1000  elapsed 3.2s  lr 0.001"


def test_the_cli_trains_as_two_ranks_and_rank_0_alone_writes_and_tracks(tiny_prepared, tmp_path):
    """`recsys-pretrain pretrain --nproc 2`: torchrun runs the command as two ranks; one model directory,
    one MLflow run, one JSON report."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "recsys_pretrain.cli", "--config", "configs/tiny.yaml", "pretrain", "--nproc", "2",
           "--model", "bert4rec", "--data", str(tiny_prepared["prepared"]), "--out", str(out),
           f"pretrain.tracking_uri={uri}", "bert4rec.dropout=0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])  # printed once, by rank 0
    assert done.stdout.count('"run_id"') == 1 and report["test"]["users"] > 100
    assert (out / "model" / "model.json").exists()
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [report["run_id"]]


def test_the_nightly_pretrain_step_trains_through_the_launcher(tmp_path, monkeypatch):
    """flow.nproc = 2: the flow's pretrain step runs `pretrain --nproc`'s torchrun command and returns what
    rank 0 reports (one MLflow run, nested under the flow's parent run)."""
    from mlflow.tracking import MlflowClient

    from recsys_pretrain import nightly as N
    from recsys_pretrain.config import load_config
    from recsys_pretrain.tracking import MLflowTracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml",
                      [f"data_dir={tmp_path / 'data'}", "flow.nproc=2", "pretrain.bert4rec.dropout=0"])
    prepared = N.prepare_step(N.ingest_step(N.synthesize_log(cfg), cfg), cfg)
    tracker = MLflowTracker(uri)
    with tracker.start_run("flows", "night") as parent:
        res = N.pretrain_step(prepared, "bert4rec", cfg, uri, parent)
    assert res["model_uri"] and Path(res["model_dir"], "model.json").exists() and res["test"]["users"] > 100
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.mlflow.parentRunId = '{parent}'")
    assert [r.info.run_id for r in runs] == [res["run_id"]]
