"""`make run` as a new user meets it: a fresh clone of this repository, `make run` timed end to end (the
virtualenv, the install, the whole nightly flow on the embedded default), then a second night on the same
log (ingest cached, pretraining warm-started from the champions), then the MLflow UI check
(benchmarks/mlflow_ui.py) on the store those two nights left.

    python benchmarks/make_run.py

Results: benchmarks/results/make_run.{md,json} (and mlflow_ui.{md,json,png}).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, write_results  # noqa: E402

ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
       "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MPLBACKEND": "Agg"}


def timed(cmd: list[str], cwd: Path, log: Path, env: dict) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    secs = time.perf_counter() - t0
    if code:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}); see {log}")
    return secs


def flow_seconds(log: Path) -> float | None:
    """The flow's own time: Prefect's local API starting to stopping, from its log timestamps."""
    stamps = re.findall(r"^(\d\d):(\d\d):(\d\d)\.\d+ \| INFO +\| prefect - (Starting|Stopping) temporary server",
                        log.read_text(), flags=re.M)
    if len(stamps) < 2:
        return None
    (h0, m0, s0, _), (h1, m1, s1, _) = stamps[0], stamps[-1]
    return ((int(h1) - int(h0)) * 3600 + (int(m1) - int(m0)) * 60 + int(s1) - int(s0)) % 86400


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="make-run-"))
    clone = work / "recsys-pretrain"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = {**os.environ, **ENV, "PREFECT_HOME": str(clone / ".prefect")}
    env.pop("MLFLOW_TRACKING_URI", None)
    first = timed(["make", "run"], clone, work / "night1.log", env)
    second = timed([str(clone / ".venv" / "bin" / "python"), "-m", "flows.nightly", "--config",
                    "configs/default.yaml"], clone, work / "night2.log", env)
    tail = (work / "night2.log").read_text()
    where = tail[tail.find("## Where things are"):] if "## Where things are" in tail else ""
    store = f"sqlite:///{clone / 'data' / 'mlflow.db'}"
    ui = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mlflow_ui.py"), "--store", store],
                        capture_output=True, text=True)
    res = {"make_run_seconds": first, "night1_flow_seconds": flow_seconds(work / "night1.log"),
           "night2_seconds": second, "night2_flow_seconds": flow_seconds(work / "night2.log"),
           "mlflow_ui_check": "passed" if ui.returncode == 0 else f"failed: {ui.stdout[-500:]}{ui.stderr[-500:]}",
           "where_things_are": where}
    md = ["# `make run` from a fresh clone, 2 cores", "",
          "| step | wall time |", "|---|---:|",
          f"| `make run` (venv + pip install + the whole nightly flow) | {first:.0f} s |",
          f"| ... of which the flow (Prefect local API up to down) | {res['night1_flow_seconds']} s |",
          f"| second night, same log (`python -m flows.nightly`: ingest cached, warm start) | {second:.0f} s |",
          f"| ... of which the flow | {res['night2_flow_seconds']} s |", "",
          "Target: the whole flow within 10 minutes on 2 cores. The install's time depends on pip's cache "
          "(warm here: the wheels were on this machine).", "",
          f"MLflow UI check on the two nights' store: {res['mlflow_ui_check']} (benchmarks/results/mlflow_ui.md).",
          "", "What `make run` printed last (second night):", "", where]
    write_results("make_run", res, "\n".join(md) + "\n")
    print("\n".join(md))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
