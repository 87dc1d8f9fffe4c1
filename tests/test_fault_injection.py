"""kill -9 at a few points of ingest, prepare, pretrain and index: the previous outputs stay whole and
readable, and running the same command again completes and leaves no leftovers."""

import json
import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

from recsys_pretrain.checkpoint import load_model_dir
from recsys_pretrain.config import SynthConfig
from recsys_pretrain.data.synthetic import write_synthetic
from recsys_pretrain.io import MARKER


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "recsys_pretrain.cli", *args]


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr[-2000:]


def _env() -> dict:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "OMP_NUM_THREADS": "1"}


def _kill(cmd: list[str], when) -> int | None:
    """Start `cmd` and SIGKILL it `when` (seconds, or a predicate of its pid polled every 10 ms). Returns
    None when it was killed, its return code when it had already finished."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + (when if isinstance(when, float) else 300.0)
    while proc.poll() is None and time.monotonic() < deadline:
        if not isinstance(when, float) and when(proc.pid):
            break
        time.sleep(0.01)
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return None


def _writing(path):
    """A predicate: the process `pid` has started writing a new version of `path` (its staging directory)."""
    return lambda pid: any(path.parent.glob(f".{path.name}.v-{pid}-*"))


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _leftovers(path):
    """What killed writes left beside `path`: anything of its own but the live version, versions replaced
    within the grace period (published: they hold the marker, which a killed write never wrote) and the
    publish lock."""
    keep = {path.resolve().name, f".{path.name}.lock"}
    keep |= {p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.v-") and (p / MARKER).exists()
             and (p / ".retired").exists()}
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.") and p.name not in keep)


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    raw = root / "events.csv"
    write_synthetic(SynthConfig(n_users=4000, n_items=800, events_per_user=60, seed=5), raw)
    return root, raw


@pytest.mark.parametrize("stage", ["ingest", "prepare"])
def test_killed_data_stage_keeps_the_previous_output(log, stage):
    root, raw = log
    ingested, prepared = root / "ingested", root / "prepared"
    cmds = {"ingest": _cli("ingest", str(raw), "--out", str(ingested), "id_type=int"),
            "prepare": _cli("prepare", str(ingested), "--out", str(prepared))}
    if not ingested.exists():
        _run(cmds["ingest"])
    out = ingested if stage == "ingest" else prepared
    if not out.exists():
        _run(cmds[stage])
    before = _snapshot(out)
    # killed in the middle of writing the new version (its staging directory exists), and at a moment
    for when in (_writing(out), 2.0):
        code = _kill(cmds[stage], when)
        assert code is None or (code == 0 and isinstance(when, float))
        after = _snapshot(out)  # the old version whole, or (if it finished) a new one of the same data
        assert sorted(after) == sorted(before)
        if code is None and not isinstance(when, float):  # killed while its new version was being written
            assert after == before
        # killed at a moment: before its publication (the old version) or after it (a whole new one)
        rows = "report.json" if stage == "ingest" else "meta.json"
        assert json.loads(after[rows]).get("rows_read", 0) == json.loads(before[rows]).get("rows_read", 0)
    _run(cmds[stage])  # the same command again completes, and removes what the killed runs left
    assert _leftovers(out) == []
    assert pl.read_parquet(out / ("events.parquet" if stage == "ingest" else "loo.parquet")).height > 0


def test_killed_pretrain_and_index_keep_the_previous_model_and_index(log, tiny_prepared):
    root, _ = log
    run, index = root / "run", root / "index"
    train = _cli("pretrain", "--model", "bert4rec", "--data", str(tiny_prepared["prepared"]), "--out", str(run),
                 "--no-tracking", "bert4rec.dim=16", "bert4rec.n_heads=2", "bert4rec.n_layers=1",
                 "bert4rec.max_len=20", "bert4rec.train.batch_size=8", "bert4rec.train.epochs=12",
                 "bert4rec.train.eval_every=4", "bert4rec.train.progress=false")
    _run([*train[:-1], "bert4rec.train.epochs=1"])  # a first model: the previous output
    build = _cli("index", str(run / "model"), "--out", str(index), "--no-tracking", "--factory", "HNSW16")
    _run(build)
    model_before, index_before = _snapshot(run / "model"), _snapshot(index)

    # training a new model (another config) into the same --out, killed after its first epoch's checkpoint
    last = run / "checkpoints" / "last.pt"
    stamp = last.stat().st_mtime_ns
    assert _kill([*train, "--restart"], lambda pid: last.exists() and last.stat().st_mtime_ns != stamp) is None
    assert _snapshot(run / "model") == model_before
    # ... and while it writes the new model directory: the old model or the new one, whole
    assert _kill([*train, "--restart"], _writing(run / "model")) is None
    load_model_dir(run / "model")
    _run([*train, "--restart"])  # the same command again completes
    assert json.loads((run / "model" / "model.json").read_text())["config"]["train"]["epochs"] == 12
    assert _leftovers(run / "model") == []

    from recsys_pretrain.index import load_index

    # a new index of the new model, killed while it writes it (a small index is written in milliseconds, so
    # the kill may land just after the swap): the old index or the new one, whole
    assert _kill(build, _writing(index)) is None
    load_index(index)  # its files agree with its index.json
    _run(build)
    assert json.loads((index / "index.json").read_text())["embeddings_sha256"] != \
        json.loads(index_before["index.json"])["embeddings_sha256"]
    assert _leftovers(index) == []
