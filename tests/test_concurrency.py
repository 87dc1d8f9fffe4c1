"""Two runs at once: promotions are serialised (the stronger challenger ends as champion whatever the
timing), state.json loses no update, and a run killed mid-way is marked KILLED by the next one."""

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
from mlflow.tracking import MlflowClient

from recsys_pretrain import nightly as N
from recsys_pretrain.config import load_config
from recsys_pretrain.registry import get_alias_version
from recsys_pretrain.tracking import MLflowTracker, redact_uri
from recsys_pretrain.train.pretrain import pretrain


@pytest.fixture(scope="module")
def challengers(tiny_prepared, tmp_path_factory):
    """A weak and a strong mf model of the same data, logged in one MLflow store."""
    root = tmp_path_factory.mktemp("race")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    out = {}
    for name, dim in (("weak", 1), ("strong", 16)):
        cfg = load_config(None, ["pretrain.model=mf", f"pretrain.mf.dim={dim}"]).pretrain
        res = pretrain(tiny_prepared["prepared"], cfg, root / name, tracker=MLflowTracker(uri))
        out[name] = {"run_id": res.run_id, "model_uri": res.model_uri, "test": res.test}
    assert out["strong"]["test"]["ndcg_at_10"] > out["weak"]["test"]["ndcg_at_10"] + 0.01
    return {"uri": uri, "root": root, **out}


@pytest.mark.parametrize("round_", range(3))
def test_two_promotions_at_once_leave_the_stronger_champion(challengers, tiny_prepared, round_):
    cfg = load_config(None, [f"data_dir={challengers['root']}"])
    name, uri = f"race-{round_}", challengers["uri"]
    start, decisions, errors = threading.Barrier(2), {}, []

    def promote(which: str) -> None:
        try:
            start.wait()
            decisions[which] = N.promote_step(name, challengers[which], str(tiny_prepared["prepared"]), cfg, uri)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    order = ("weak", "strong") if round_ % 2 == 0 else ("strong", "weak")
    threads = [threading.Thread(target=promote, args=(w,)) for w in order]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    champ = get_alias_version(name, "champion", uri)
    assert champ["run_id"] == challengers["strong"]["run_id"]
    assert decisions["strong"]["promoted"]
    # the weak one was promoted only if it came first, and then only until the strong one replaced it
    assert {decisions["weak"]["version"], decisions["strong"]["version"]} == {1, 2}


def test_state_updates_at_once_lose_nothing(tmp_path):
    cfg = load_config(None, [f"data_dir={tmp_path}"])

    def bump(i: int) -> None:
        for _ in range(20):
            N.update_state(cfg, lambda s: s.update(count=s.get("count", 0) + 1, **{f"t{i}": True}))

    threads = [threading.Thread(target=bump, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = N.read_state(cfg)
    assert state["count"] == 80 and all(state[f"t{i}"] for i in range(4))


def test_a_killed_run_is_marked_killed_by_the_next_start(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = textwrap.dedent(f"""
        import os, signal, sys
        from recsys_pretrain.tracking import MLflowTracker
        t = MLflowTracker({uri!r})
        with t.start_run("exp", "doomed") as run_id:
            print(run_id, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == -signal.SIGKILL
    doomed = proc.stdout.split()[-1]
    client = MlflowClient(uri)
    assert client.get_run(doomed).info.status == "RUNNING"  # what the kill left behind

    tracker = MLflowTracker(uri)
    with tracker.start_run("exp", "next") as live:
        assert client.get_run(live).info.status == "RUNNING"
        # a run of a live process (this one) is not touched by a start beside it (another thread)
        beside = threading.Thread(target=lambda: MLflowTracker(uri).start_run("exp", "beside").__enter__())
        beside.start()
        beside.join()
        assert client.get_run(live).info.status == "RUNNING"
    killed = client.get_run(doomed)
    assert killed.info.status == "KILLED" and "gone" in killed.data.tags["ended_by"]
    assert client.get_run(live).info.status == "FINISHED"


def test_credentials_never_reach_summaries():
    uri = "https://alice:s3cret@mlflow.example.org/"
    md = N.summary_markdown({"mlflow_run_id": "abc", "models": {}}, uri)
    assert "s3cret" not in md and "alice" not in md and "mlflow.example.org" in md
    assert redact_uri("sqlite:///data/mlflow.db") == "sqlite:///data/mlflow.db"


def test_a_retried_promotion_registers_once(challengers, tiny_prepared):
    cfg = load_config(None, [f"data_dir={challengers['root']}"])
    name, uri = "retried", challengers["uri"]
    first = N.promote_step(name, challengers["strong"], str(tiny_prepared["prepared"]), cfg, uri)
    again = N.promote_step(name, challengers["strong"], str(tiny_prepared["prepared"]), cfg, uri)
    assert first["version"] == again["version"] == 1
    assert [int(v.version) for v in MlflowClient(uri).search_model_versions(f"name = '{name}'")] == [1]
