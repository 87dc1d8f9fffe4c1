"""kill -9 at a few points of ingest, prepare, pretrain and index: the previous outputs stay whole and
readable, and running the same command again completes and leaves no leftovers."""

import json
import os
import signal
import subprocess
import sys

import polars as pl
import pytest

from recsys_pretrain.config import SynthConfig
from recsys_pretrain.data.synthetic import write_synthetic

KILL_AFTER_S = (1.5, 3.0)  # interpreter start-up is about a second: these land in imports, reading or writing


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "recsys_pretrain.cli", *args]


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr[-2000:]


def _env() -> dict:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "OMP_NUM_THREADS": "1"}


def _kill_after(cmd: list[str], seconds: float) -> int | None:
    """Start `cmd`, SIGKILL it after `seconds` (None if it had already finished: then its return code)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    try:
        proc.wait(timeout=seconds)
        return proc.returncode
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _leftovers(path):
    """Entries beside `path` that belong to it, other than the live version."""
    live = path.resolve().name
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.") and p.name != live)


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
    for seconds in KILL_AFTER_S:
        code = _kill_after(cmds[stage], seconds)
        assert code in (None, 0)
        after = _snapshot(out)  # the old version whole, or (if it finished) a new one of the same data
        assert sorted(after) == sorted(before)
        if code is None:
            assert after == before
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

    for seconds in (3.0, 6.0):  # training a new model (another config) into the same --out, killed
        assert _kill_after([*train, "--restart"], seconds) is None
        assert _snapshot(run / "model") == model_before
    _run([*train, "--restart"])  # the same command again completes
    assert json.loads((run / "model" / "model.json").read_text())["config"]["train"]["epochs"] == 12
    assert _leftovers(run / "model") == []

    from recsys_pretrain.index import load_index

    for seconds in (1.5, 3.0):  # a new index of the new model, killed: the old index or the new one, whole
        assert _kill_after(build, seconds) in (None, 0)
        load_index(index)  # its files agree with its index.json
    _run(build)
    assert json.loads((index / "index.json").read_text())["embeddings_sha256"] != \
        json.loads(index_before["index.json"])["embeddings_sha256"]
    assert _leftovers(index) == []
