"""Check the MLflow UI as a user would: start `mlflow server` on 127.0.0.1 over a tracking store, open the
run comparison of an experiment's pretraining runs in headless Chromium, save a screenshot, and fail unless
every run and its key metrics are on the rendered page.

    python benchmarks/mlflow_ui.py                                   # the store `make run` writes (data/mlflow.db)
    python benchmarks/mlflow_ui.py --store sqlite:///path/mlflow.db --experiment events

Needs Debian's `chromium` (apt-get install chromium). Results: benchmarks/results/mlflow_ui.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, write_results  # noqa: E402

KEY_METRICS = ("test/ndcg_at_10", "test/hr_at_10")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1600,3400"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: str, port: int, log: Path) -> subprocess.Popen:
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", store, "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("mlflow server did not answer /health within 120 s")


def chromium(args: list[str], profile: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=timeout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default=f"sqlite:///{ROOT / 'data' / 'mlflow.db'}")
    p.add_argument("--experiment", help="experiment name (default: the one with the most pretraining runs)")
    p.add_argument("--wait-ms", type=int, default=20_000, help="virtual time the page gets to render")
    args = p.parse_args()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(args.store)
    exps = client.search_experiments()
    runs_of = {e.experiment_id: client.search_runs([e.experiment_id], "tags.model_type != ''", max_results=50)
               for e in exps}
    if args.experiment:
        exp = next((e for e in exps if e.name == args.experiment), None)
        if exp is None:
            raise SystemExit(f"no experiment {args.experiment!r} in {args.store}")
    else:
        exp = max(exps, key=lambda e: len(runs_of[e.experiment_id]))
    runs = runs_of[exp.experiment_id]
    if not runs:
        raise SystemExit(f"{args.store}: no pretraining runs (tag model_type) to compare; run `make run` first")

    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="mlflow-ui-"))
    server = start_server(args.store, port, work / "server.log")
    try:
        ids = json.dumps([r.info.run_id for r in runs])
        url = (f"http://127.0.0.1:{port}/#/compare-runs?runs={urllib.parse.quote(ids)}"
               f"&experiments={urllib.parse.quote(json.dumps([exp.experiment_id]))}")
        shot = RESULTS / "mlflow_ui.png"
        t0 = time.perf_counter()
        chromium([f"--screenshot={shot}", f"--virtual-time-budget={args.wait_ms}", url], work / "profile-shot")
        dom = chromium(["--dump-dom", f"--virtual-time-budget={args.wait_ms}", url], work / "profile-dom").stdout
        seconds = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=30)

    checks = {}
    for r in runs:
        name = r.info.run_name
        checks[f"run name: {name}"] = name in dom
        for k in KEY_METRICS:
            v = r.data.metrics.get(k)
            if v is not None:
                checks[f"{name}: {k} = {v:.3f}"] = f"{v:.3f}" in dom  # the compare table shows 3 decimals
    for k in KEY_METRICS:
        checks[f"metric row: {k}"] = k in dom
    missing = [k for k, ok in checks.items() if not ok]
    res = {"store": args.store, "experiment": exp.name, "runs": [r.info.run_name for r in runs], "url": url,
           "screenshot": str(shot.relative_to(ROOT)) if shot.exists() else None, "checks": checks,
           "missing": missing, "browser_seconds": seconds, "dom_chars": len(dom)}
    md = ["# MLflow UI: run comparison, checked in headless Chromium", "",
          f"Store `{args.store}`, experiment `{exp.name}`, {len(runs)} pretraining runs; `mlflow server` on "
          f"127.0.0.1, the compare-runs page rendered by Chromium (headless) for {args.wait_ms / 1000:.0f} s "
          "of virtual time.", "", "![MLflow run comparison](mlflow_ui.png)", "",
          f"{len(checks) - len(missing)} of {len(checks)} checks found on the rendered page:", ""]
    md += [f"- {'ok' if ok else '**missing**'}: {k}" for k, ok in checks.items()]
    write_results("mlflow_ui", res, "\n".join(md) + "\n")
    print("\n".join(md))
    if missing or not shot.exists():
        raise SystemExit(f"the UI page lacks {len(missing)} expected item(s): {missing[:5]}")


if __name__ == "__main__":
    main()
