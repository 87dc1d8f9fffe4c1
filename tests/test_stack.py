"""The deployed stack end to end, without containers: docker/compose.yaml's services started as processes on
free loopback ports, with the commands compose gives them (read from the file; hosts, ports and paths
replaced):

- `mlflow server` on a SQLite store in a temp dir (compose: PostgreSQL and the basic-auth app; not here),
- the prefect-server service's `prefect server start` (its home in the temp dir, no analytics, no UI),
- the prefect-worker service's commands: `prefect work-pool create`, `prefect deploy --all` of the
  repository's prefect.yaml (two local changes: the pull step's working directory is this checkout, not the
  image's /app, and no cron schedule: the test starts the runs itself), `prefect worker start
  --with-healthcheck`,
- the serve service's `recsys-pretrain serve --index <data>/serving/current.json`: following the pointer.

The service starts before anything is published (live, not ready), then two deployment runs on the tiny
config: night 1 a deliberately weak mf, night 2 mf's default solver on the same log, which beats it and is
promoted and published. A thread polls the service all along: no connection error and no 5xx once it was
first ready; the service swaps to night 2's model without a restart. Every wait has a deadline; every process
is stopped by its PID (its process group: the worker's flow runs, MLflow's server workers) in a finally; each
process logs to a file, printed when the test fails.
"""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml

from tests.conftest import ROOT

BIN = Path(sys.executable).parent  # the environment's mlflow, prefect and recsys-pretrain
OVERALL_S = 360  # the whole test
SERVER_START_S = 180  # MLflow and Prefect servers (migrations on a fresh SQLite store; 2 busy cores)
NIGHT_S = 180  # one deployment run, scheduled to completed
SWAP_S = 60  # the service loads a new publication after the run completed
STOP_S = 5  # SIGTERM, then SIGKILL
NIGHT = ["flow.models=[mf]", "flow.finetune=false", "flow.warm_start=false"]  # the least a night trains
WEAK = ["pretrain.mf.loss=softmax", "pretrain.mf.train.epochs=1", "pretrain.mf.train.lr=1e-6"]
FLOW_NAME = "nightly-pretraining"
COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]


def _commands(service: str) -> list[list[str]]:
    """A compose service's command as argv lists: `sh -c "a || true; b && c"` split into a, b, c."""
    argv = COMPOSE[service]["command"]
    argv = argv if isinstance(argv, list) else shlex.split(argv)
    if argv[:2] == ["sh", "-c"]:
        parts = [shlex.split(part) for part in re.split(r"\|\||&&|;", argv[2]) if part.strip()]
        return [part for part in parts if part != ["true"]]
    return [argv]


def _here(argv: list[str], *flags: str, **options) -> list[str]:
    """A compose command run here: its program from this environment, each --option's value replaced (or
    the option added), `flags` added."""
    out = [str(BIN / argv[0]), *argv[1:]]
    for name, value in options.items():
        option = "--" + name.replace("_", "-")
        if option in out:
            out[out.index(option) + 1] = str(value)
        else:
            out += [option, str(value)]
    return out + list(flags)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """Processes started in their own process group, each logging to a file; stopped by PID."""

    def __init__(self, tmp: Path, env: dict[str, str]):
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        self.deadline = time.monotonic() + OVERALL_S
        self.api: httpx.Client | None = None

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        return proc

    def run(self, name: str, argv: list[str], timeout: float = 120) -> None:
        """A command run to its end (as the worker's `sh -c` runs them), within its timeout."""
        proc = self.start(name, argv)
        try:
            rc = proc.wait(timeout=min(timeout, self.left()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} did not finish within {timeout:g} s") from None
        assert rc == 0, f"{name} exited with {rc}"

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        assert left > 0, f"the stack test ran past its {OVERALL_S} s"
        return left

    def wait(self, cond, what: str, timeout: float, every: float = 0.5, alive: tuple[str, ...] = ()):
        """cond() until it returns something truthy (returned), within timeout and the overall deadline; the
        long-running processes named in `alive` must stay up meanwhile."""
        end = time.monotonic() + min(timeout, self.left())
        while True:
            for name in alive:
                rc = self.procs[name].poll()
                assert rc is None, f"{name} exited ({rc}) while waiting for {what}"
            try:
                got = cond()
            except (httpx.HTTPError, OSError, ValueError, KeyError):
                got = None
            if got:
                return got
            assert time.monotonic() < end, f"timed out ({timeout:g} s) waiting for {what}"
            time.sleep(every)

    def stop(self) -> None:
        if self.api is not None:
            self.api.close()
        t0 = time.monotonic()
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, t0 + STOP_S - time.monotonic()))
            except subprocess.TimeoutExpired:  # (MLflow's server takes its time over SIGTERM)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)

    def print_logs(self, lines: int = 150) -> None:
        for log in sorted(self.logs.iterdir()):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            print(f"\n===== {log.name} (last {len(tail)} lines) =====\n" + "\n".join(tail))


class Poller(threading.Thread):
    """Polls /ready, /health and the recommendation routes in a loop, recording every answer:
    (time, route, status or None, a field of the body or the connection error)."""

    ROUTES = ("/ready", "/recommend/7", "/health", "POST /recommend")

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop = url, threading.Event()
        self.seen: list[tuple[float, str, int | None, object]] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            i = 0
            while not self.stop.is_set():
                route = self.ROUTES[i % len(self.ROUTES)]
                i += 1
                try:
                    if route == "POST /recommend":
                        r = c.post("/recommend", json={"history": [1, 2, 3], "k": 5})
                    else:
                        r = c.get(route, params={"k": 5} if route.startswith("/recommend") else None)
                    body = r.json()
                    note = body.get("index_version") if r.status_code == 200 else body.get("error")
                    if route == "/health":
                        note = (body.get("model") or {}).get("run_id")
                    self.seen.append((time.monotonic(), route, r.status_code, note))
                except Exception as exc:  # a refused or dropped connection, a body that is not JSON
                    self.seen.append((time.monotonic(), route, None, f"{type(exc).__name__}: {exc}"))
                time.sleep(0.1)


def _deployment_spec(tmp: Path) -> tuple[Path, dict]:
    """The repository's prefect.yaml for this checkout: its pull step's working directory here, no schedule."""
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for step in spec["pull"]:
        if "prefect.deployments.steps.set_working_directory" in step:
            step["prefect.deployments.steps.set_working_directory"]["directory"] = str(ROOT)
    (dep,) = spec["deployments"]
    dep["schedules"] = []
    path = tmp / "prefect.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, dep


def test_the_stack_serves_each_nights_champion_without_a_restart(tmp_path):
    started = time.monotonic()
    mlflow_port, prefect_port, serve_port, worker_port = _free_port(), _free_port(), _free_port(), _free_port()
    mlflow_url, prefect_api = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api"
    serve_url = f"http://127.0.0.1:{serve_port}"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_")) and k != "RECSYS_ADMIN_TOKEN"}
    env.update({
        # as docker/compose.yaml's x-app-env, on loopback
        "MLFLOW_TRACKING_URI": mlflow_url, "PREFECT_API_URL": prefect_api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_WORKER_QUERY_SECONDS": "1",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg",
        # the worker's health server, as compose configures it, on a free port
        **{k: str(v) for k, v in COMPOSE["prefect-worker"]["environment"].items() if k.startswith("PREFECT_WORKER_")},
        "PREFECT_WORKER_WEBSERVER_PORT": str(worker_port),
    })
    (serve_cmd,) = _commands("serve")
    (prefect_server_cmd,) = _commands("prefect-server")
    pool_cmd, deploy_cmd, worker_cmd = _commands("prefect-worker")
    # compose's service follows the pointer the flow publishes on the data volume
    assert serve_cmd[serve_cmd.index("--index") + 1].endswith("/serving/current.json")
    data = tmp_path / "data"
    pointer = data / "tiny" / "serving" / "current.json"  # where the flow on configs/tiny.yaml publishes
    spec, dep = _deployment_spec(tmp_path)
    pool = dep["work_pool"]["name"]
    stack = Stack(tmp_path, env)
    poller = Poller(serve_url)
    try:
        stack.start("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination",
                               str(tmp_path / "mlartifacts"), "--host", "127.0.0.1", "--port", str(mlflow_port),
                               "--workers", "1"])
        stack.start("prefect-server", _here(prefect_server_cmd, "--no-ui", host="127.0.0.1", port=prefect_port))
        # the service first: before anything is published it is live and not ready
        serve = stack.start("serve", _here(serve_cmd, host="127.0.0.1", port=serve_port, index=pointer,
                                           reload_poll_s=0.5))
        health = stack.wait(lambda: httpx.get(f"{serve_url}/health", timeout=5).json(), "the service to be live",
                            SERVER_START_S, alive=("serve",))
        assert health["status"] == "waiting" and health["ready"] is False
        assert str(pointer) in health["waiting_for"] and "first publication" in health["waiting_for"]
        r = httpx.get(f"{serve_url}/ready", timeout=5)
        assert r.status_code == 503 and r.json()["ready"] is False
        r = httpx.get(f"{serve_url}/recommend/7", timeout=5)
        assert r.status_code == 503 and r.json()["error"].startswith("not ready: ")
        poller.start()

        stack.wait(lambda: httpx.get(f"{mlflow_url}/health", timeout=5).status_code == 200, "MLflow's server",
                   SERVER_START_S, alive=("mlflow",))
        stack.wait(lambda: httpx.get(f"{prefect_api}/health", timeout=5).status_code == 200, "Prefect's server",
                   SERVER_START_S, alive=("prefect-server",))
        # the worker's command in docker/compose.yaml
        assert pool_cmd[:3] == ["prefect", "work-pool", "create"] and pool in pool_cmd
        stack.run("work-pool", _here(pool_cmd))
        assert worker_cmd[:3] == ["prefect", "worker", "start"] and pool in worker_cmd
        stack.start("worker", _here(worker_cmd))  # (compose starts it after the deploy; meanwhile here)
        assert deploy_cmd[:2] == ["prefect", "deploy"]
        stack.run("deploy", _here(deploy_cmd, prefect_file=spec))
        alive = ("mlflow", "prefect-server", "serve", "worker")
        # compose's health check of the worker: its health server answers while it polls the pool
        stack.wait(lambda: httpx.get(f"http://127.0.0.1:{worker_port}/health", timeout=5).status_code == 200,
                   "the worker's health server", SERVER_START_S, alive=alive)

        api = stack.api = httpx.Client(base_url=prefect_api, timeout=30)

        def call(method: str, path: str, **kw) -> dict:
            """Prefect's REST API, retried for a minute as Prefect's own client retries: on 503 (its SQLite
            store was busy: nothing was written), 502 and 429."""
            end = time.monotonic() + min(60, stack.left())
            while (r := api.request(method, path, **kw)).status_code in (429, 502, 503) and time.monotonic() < end:
                time.sleep(1)
            return r.raise_for_status().json()

        deployment = call("GET", f"/deployments/name/{FLOW_NAME}/{dep['name']}")
        assert deployment["entrypoint"] == dep["entrypoint"] and deployment["work_pool_name"] == pool
        print(f"stack up after {time.monotonic() - started:.0f} s")

        def night(overrides: list[str]) -> None:
            params = {"config": str(ROOT / "configs" / "tiny.yaml"), "overrides": [f"data_dir={data}", *overrides]}
            run = call("POST", f"/deployments/{deployment['id']}/create_flow_run", json={"parameters": params})

            def finished():
                state = call("GET", f"/flow_runs/{run['id']}")["state_type"]
                assert state not in ("FAILED", "CRASHED", "CANCELLED"), f"flow run {run['id']} ended {state}"
                return state == "COMPLETED"

            t0 = time.monotonic()
            stack.wait(finished, f"flow run {run['id']} to complete", NIGHT_S, every=1, alive=alive)
            print(f"night: {time.monotonic() - t0:.0f} s")

        def served_model() -> dict:
            return httpx.get(f"{serve_url}/health", timeout=5).json()["model"]

        # night 1: the first publication is served by the process that was waiting for it
        night([*NIGHT, *WEAK])
        first = json.loads(pointer.read_text())
        stack.wait(lambda: httpx.get(f"{serve_url}/ready", timeout=5).status_code == 200,
                   "the service to be ready", SWAP_S, alive=alive)
        model = stack.wait(lambda: (m := served_model()) and m["run_id"] == first["run_id"] and m,
                           "the first champion to be served", SWAP_S, alive=alive)
        assert model["version"] == first["version"] == 1 and model["registered"] == "models:/recsys-mf@champion"
        started_at = httpx.get(f"{serve_url}/health", timeout=5).json()["started_at"]

        # night 2: a better model on the same log is promoted, published and swapped in without a restart
        night(NIGHT)
        second = json.loads(pointer.read_text())
        assert second["version"] == 2 and second["run_id"] != first["run_id"], second
        stack.wait(lambda: served_model()["run_id"] == second["run_id"], "the new champion to be served", SWAP_S,
                   alive=alive)
        health = httpx.get(f"{serve_url}/health", timeout=5).json()
        assert health["model"]["version"] == 2 and health["started_at"] == started_at and health["ready"]
        assert health["last_reload_error"] is None
        time.sleep(1)  # a few more answers from the new model
        poller.stop.set()
        poller.join(timeout=15)
        assert serve.poll() is None, "the service exited"

        seen = poller.seen
        errors = [s for s in seen if s[2] is None]
        assert not errors, f"connection errors: {errors[:5]}"
        # ready: the first answer from a model (the routes are polled in turn: whichever saw it first)
        ready_at = min(t for t, route, status, _ in seen if route != "/health" and status == 200)
        before = {(route, status) for t, route, status, _ in seen if t < ready_at}
        assert before <= {("/ready", 503), ("/recommend/7", 503), ("POST /recommend", 503), ("/health", 200)}, before
        after = [s for s in seen if s[0] >= ready_at]
        bad = [s for s in after if s[2] >= 500]
        assert not bad, f"{len(bad)} 5xx answers once ready: {bad[:5]}"
        assert all(s[2] == 200 for s in after), [s for s in after if s[2] != 200][:5]
        # the clients saw both champions, in order (index_version counts the swaps)
        versions = [note for _, route, _, note in after if route.endswith("/recommend") or route == "/recommend/7"]
        assert versions == sorted(versions) and versions[0] == 1 and versions[-1] == 2, versions[-5:]
        run_ids = [note for _, route, _, note in after if route == "/health"]
        assert run_ids[0] == first["run_id"] and run_ids[-1] == second["run_id"]
        print(f"stack test: {len(seen)} answers, {len(after)} once ready, "
              f"{time.monotonic() - started:.0f} s in all")
    except BaseException:
        poller.stop.set()
        stack.print_logs()
        raise
    finally:
        poller.stop.set()
        stack.stop()
    assert all(p.poll() is not None for p in stack.procs.values())
