"""Outputs are never lost or stale: checkpoints of another run are not resumed, an output never replaces
an input or a directory this project did not write, killed writes are cleaned up, a published directory
is never missing, and a full disk is a one-line error with the old outputs intact."""

import contextlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys_pretrain.cli import main
from recsys_pretrain.config import load_config
from recsys_pretrain.io import MARKER, OutputError, atomic_dir, clean_stale
from recsys_pretrain.train.loop import CheckpointMismatch
from recsys_pretrain.train.pretrain import pretrain

SOFTMAX = ["pretrain.model=mf", "pretrain.mf.dim=8", "pretrain.mf.loss=softmax", "pretrain.mf.train.epochs=3",
           "pretrain.mf.train.eval_every=1", "pretrain.mf.train.progress=false"]


def _weights(run_dir):
    return torch.load(run_dir / "model" / "weights.pt", weights_only=True)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---- 1. a checkpoint is resumed only by the run that wrote it ---------------------------------------------
def test_pretrain_resumes_only_its_own_checkpoint(tiny_prepared, tmp_path, capsys):
    out = tmp_path / "run"
    first = pretrain(tiny_prepared["prepared"], load_config(None, SOFTMAX).pretrain, out)
    w1 = _weights(out)

    # another learning rate into the same --out: refused, naming what differs; nothing is overwritten
    other = load_config(None, [*SOFTMAX, "pretrain.mf.train.lr=0.05"]).pretrain
    with pytest.raises(CheckpointMismatch, match=r"train\.lr: 0\.01 -> 0\.05"):
        pretrain(tiny_prepared["prepared"], other, out)
    assert all(torch.equal(w1[k], v) for k, v in _weights(out).items())

    # another architecture: the same clear refusal, not a size-mismatch traceback
    wider = load_config(None, [*SOFTMAX, "pretrain.mf.dim=12"]).pretrain
    with pytest.raises(CheckpointMismatch, match=r"config\.dim: 8 -> 12"):
        pretrain(tiny_prepared["prepared"], wider, out)

    # asked to start anew over it: trains the new config (other weights), and says so
    import dataclasses

    fresh = pretrain(tiny_prepared["prepared"], dataclasses.replace(other, resume="restart"), out)
    assert "starting anew" in capsys.readouterr().err
    assert not torch.equal(_weights(out)["item.weight"], w1["item.weight"])
    assert fresh.fit.epochs_run == 3

    # the same config again: resumes the finished run (no more training) and says so
    again = pretrain(tiny_prepared["prepared"], dataclasses.replace(other, resume="restart"), out)
    assert "resuming from" in capsys.readouterr().err
    assert again.fit.best_epoch == fresh.fit.best_epoch and again.test == fresh.test
    assert first.fit.epochs_run == 3


def test_pretrain_cli_refuses_another_runs_checkpoint_in_one_line(tiny_prepared, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["pretrain", "--model", "mf", "--data", str(tiny_prepared["prepared"]), "--out", str(out),
            "--no-tracking", "mf.dim=8", "mf.loss=softmax", "mf.train.epochs=2"]
    assert main(base) == 0
    capsys.readouterr()
    assert main([*base, "mf.train.lr=0.03"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "train.lr" in err and "--restart" in err and len(err.splitlines()) == 1
    assert main([*base, "mf.train.lr=0.03", "--restart"]) == 0


# ---- 2. an output never replaces an input, nor a directory this project did not write -------------------
def test_output_that_holds_an_input_is_refused(tmp_path, capsys):
    d = tmp_path / "dir"
    d.mkdir()
    (d / "events.csv").write_text("user_id,item_id,timestamp,event_type\n1,2,1600000000,click\n")
    assert main(["ingest", str(d / "events.csv"), "--out", str(d), "id_type=int"]) == 2
    err = capsys.readouterr().err
    assert "would replace the input" in err and (d / "events.csv").exists()
    with pytest.raises(OutputError):  # --force never allows it
        from recsys_pretrain.config import IngestConfig
        from recsys_pretrain.data.ingest import ingest

        ingest([d / "events.csv"], d, IngestConfig(id_type="int"), force=True)
    assert (d / "events.csv").exists()


def test_stages_refuse_a_directory_they_did_not_write_unless_forced(tiny_prepared, tmp_path, capsys):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8 not ours")
    for argv in (["prepare", str(tiny_prepared["ingested"]), "--out", str(foreign)],
                 ["ingest", str(tiny_prepared["raw"]), "--out", str(foreign), "id_type=int"]):
        assert main(argv) == 2
        assert "did not write" in capsys.readouterr().err
        assert (foreign / "holiday.jpg").read_bytes() == b"\xff\xd8 not ours"
    # what the project wrote it replaces; a directory it did not write only with --force
    out = tmp_path / "prepared"
    assert main(["prepare", str(tiny_prepared["ingested"]), "--out", str(out)]) == 0
    assert main(["prepare", str(tiny_prepared["ingested"]), "--out", str(out)]) == 0
    assert (out / MARKER).exists()
    assert main(["prepare", str(tiny_prepared["ingested"]), "--out", str(foreign), "--force"]) == 0
    assert not (foreign / "holiday.jpg").exists() and (foreign / "loo.parquet").exists()


def test_index_refuses_a_foreign_directory_before_building(tiny_prepared, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--model", "mf", "--data", str(tiny_prepared["prepared"]), "--out", str(run),
                 "--no-tracking", "mf.dim=8"]) == 0
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    capsys.readouterr()
    assert main(["index", str(run / "model"), "--out", str(foreign), "--no-tracking"]) == 2
    assert "did not write" in capsys.readouterr().err and (foreign / "todo.txt").read_text() == "keep me"
    assert main(["index", str(run / "model"), "--out", str(run / "model"), "--no-tracking"]) == 2
    assert (run / "model" / "model.json").exists()


# ---- 6. leftovers of killed writes are removed; the published path is never missing --------------------
def test_leftovers_of_killed_writes_are_removed_and_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as stage:
        (stage / "a.txt").write_text("1")
    live = out.resolve()
    dead = _dead_pid()
    for name in (f".out.v-{dead}-dead0001", f".out.staging-{dead}-x", f".out.old-{dead}-y"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "big.bin").write_bytes(b"0" * 1000)
    os.symlink("nowhere", tmp_path / f".out.link-{dead}-z")
    running = tmp_path / f".out.v-{os.getpid()}-live0001"  # a write in progress (its process is alive)
    running.mkdir()
    other = tmp_path / f".other.v-{dead}-keep"  # another output's leftovers are not this one's to remove
    other.mkdir()
    removed = clean_stale(out)
    assert len(removed) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", ".out.lock", live.name, running.name,
                                                                 other.name])
    with atomic_dir(out) as stage:  # the next write removes the previous version once it is published
        (stage / "a.txt").write_text("2")
    assert (out / "a.txt").read_text() == "2" and live.exists()  # replaced: kept for a grace period
    os.utime(live / ".retired", (0, 0))  # ... which has passed
    with atomic_dir(out) as stage:
        (stage / "a.txt").write_text("3")
    assert not live.exists()


def test_a_published_directory_is_never_missing_during_swaps(tmp_path, monkeypatch):
    out = tmp_path / "index"
    with atomic_dir(out) as stage:
        (stage / "index.json").write_text("0")
    stop, misses, reads = threading.Event(), [], [0]

    def reader():
        while not stop.is_set():
            try:
                (out / "index.json").read_text()
            except OSError as exc:
                misses.append(exc)
            reads[0] += 1

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(300):
            with atomic_dir(out) as stage:
                (stage / "index.json").write_text(str(i))
    finally:
        stop.set()
        t.join()
    assert reads[0] > 300 and misses == []
    assert (out / "index.json").read_text() == "299"
    # replaced versions stay for a grace period after their swap, then the next publish removes them
    import recsys_pretrain.io as io_

    monkeypatch.setattr(io_, "RETIRED_GRACE_S", 0.0)
    with atomic_dir(out) as stage:
        (stage / "index.json").write_text("last")
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".index.v-")]) == 1


def test_an_older_plain_output_directory_is_upgraded_in_place(tmp_path):
    out = tmp_path / "ingested"
    out.mkdir()
    (out / MARKER).write_text("{}")
    (out / "old.txt").write_text("old")
    with atomic_dir(out) as stage:
        (stage / "new.txt").write_text("new")
    assert out.is_symlink() and (out / "new.txt").exists() and not (out / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ingested", ".ingested.lock", out.resolve().name])


def test_a_failed_write_leaves_the_previous_output_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as stage:
        (stage / "a.txt").write_text("1")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(RuntimeError), atomic_dir(out) as stage:
        (stage / "a.txt").write_text("2")
        raise RuntimeError("killed half way")
    assert (out / "a.txt").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == before


# ---- 7. a full disk is a one-line error; the previous outputs stay -----------------------------------------
@contextlib.contextmanager
def _small_tmpfs(path, size="256k"):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.decode().strip()}); "
                    "test_full_disk_error_is_one_line covers the handler")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_ingest_on_a_full_disk_keeps_the_previous_output(tmp_path, capsys):
    from recsys_pretrain.config import SynthConfig
    from recsys_pretrain.data.synthetic import write_synthetic

    small, big = tmp_path / "small.csv", tmp_path / "big.csv"
    small.write_text("user_id,item_id,timestamp,event_type\n1,2,1600000000,click\n1,3,1600000001,click\n")
    write_synthetic(SynthConfig(n_users=3000, n_items=2000, events_per_user=60, seed=3), big)
    with _small_tmpfs(tmp_path / "disk") as disk:
        out = disk / "ingested"
        assert main(["ingest", str(small), "--out", str(out), "id_type=int"]) == 0
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        capsys.readouterr()
        assert main(["ingest", str(big), "--out", str(out), "id_type=int"]) == 28
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: no space left") and len(err.splitlines()) == 1
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert sorted(p.name for p in disk.iterdir()) == sorted(["ingested", ".ingested.lock", out.resolve().name])


def test_full_disk_error_is_one_line(tiny_prepared, tmp_path, capsys, monkeypatch):
    """Wherever the full disk is hit (here: NumPy writing the model's embeddings), one line, exit 28."""
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "item_embeddings.npy")

    monkeypatch.setattr(np, "save", full)
    code = main(["pretrain", "--model", "mf", "--data", str(tiny_prepared["prepared"]), "--out",
                 str(tmp_path / "run"), "--no-tracking", "mf.dim=8"])
    err = capsys.readouterr().err.strip()
    assert code == 28 and err.startswith("error: no space left") and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "model").exists()


# ---- review follow-ups -------------------------------------------------------------------------------------
def test_an_output_of_the_older_layout_is_replaced_without_force(tmp_path):
    """Outputs written before the marker existed are recognised by their files: an upgrade does not stop the
    nightly flow on its own earlier outputs."""
    old = tmp_path / "prepared"
    old.mkdir()
    for f in ("meta.json", "loo.parquet"):
        (old / f).write_text("{}")
    with atomic_dir(old) as stage:
        (stage / "meta.json").write_text("new")
    assert (old / "meta.json").read_text() == "new"


def test_staging_directories_of_the_older_layout_are_removed_once_old(tmp_path):
    import tempfile
    import time

    stale = Path(tempfile.mkdtemp(prefix=".out.staging-", dir=tmp_path))  # what the older atomic_dir made
    fresh = Path(tempfile.mkdtemp(prefix=".out.staging-", dir=tmp_path))
    hour_ago = time.time() - 7200
    os.utime(stale, (hour_ago, hour_ago))
    assert clean_stale(tmp_path / "out") == [stale]
    assert fresh.exists()


def test_a_run_stopped_by_its_budget_goes_on_when_resumed_with_more_time(tiny_prepared, tmp_path):
    out = tmp_path / "run"
    short = load_config(None, [*SOFTMAX, "pretrain.mf.train.epochs=4", "pretrain.mf.train.max_minutes=0.00001",
                               "pretrain.refit=false"]).pretrain
    first = pretrain(tiny_prepared["prepared"], short, out)
    assert first.fit.stopped == "budget" and first.fit.epochs_run == 1
    longer = load_config(None, [*SOFTMAX, "pretrain.mf.train.epochs=4", "pretrain.refit=false"]).pretrain
    again = pretrain(tiny_prepared["prepared"], longer, out)
    assert again.fit.epochs_run == 4 and again.fit.stopped == "epochs"


def test_restart_does_not_read_an_unreadable_checkpoint(tiny_prepared, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    base = ["pretrain", "--model", "mf", "--data", str(tiny_prepared["prepared"]), "--out", str(out),
            "--no-tracking", "mf.dim=8", "mf.loss=softmax", "mf.train.epochs=1"]
    assert main([*base, "--restart"]) == 0


def test_pretrain_on_a_full_disk_is_one_line_and_leaves_no_model(tiny_prepared, tmp_path, capsys):
    """torch and NumPy report a full disk as a short write, with no errno: still one line, exit 28."""
    with _small_tmpfs(tmp_path / "disk", size="48k") as disk:
        code = main(["pretrain", "--model", "mf", "--data", str(tiny_prepared["prepared"]), "--out",
                     str(disk / "run"), "--no-tracking", "mf.dim=64", "mf.loss=softmax", "mf.train.epochs=2"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 28 and err[-1].startswith("error: no space left") and not any("Traceback" in e for e in err)
        assert not (disk / "run" / "model").exists()
