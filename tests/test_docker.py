"""No Docker engine here: check that everything docker/compose.yaml names exists in the project, that its
secrets come from the uncommitted docker/.env, that only the candidate service is published, and (where a
compose CLI is installed) that `compose config` accepts it."""

import re
import secrets
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

COMPOSE = ROOT / "docker" / "compose.yaml"
COMPOSE_UI = ROOT / "docker" / "compose.ui.yaml"  # the UIs on loopback: an override file
ENV_EXAMPLE = ROOT / "docker" / ".env.example"
EXTERNAL_IMAGES = {"postgres:16", "prefecthq/prefect:3-python3.11"}
IMAGE_ENV = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}  # read by the postgres image itself
LONG_RUNNING = {"postgres", "mlflow", "prefect-server", "prefect-worker", "serve"}
SECRET = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH_STRING")
CREDENTIALS_IN_URI = re.compile(r"://[^/\s]*:[^/\s]*@")
INTERPOLATION = re.compile(r"\$\{(\w+)(:?[-?])?([^}]*)\}")


def _services():
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _commands(cmd) -> list[list[str]]:
    """A compose command as argv lists; `sh -c "a || b; c && d"` is split into its commands."""
    argv = cmd if isinstance(cmd, list) else shlex.split(cmd)
    if argv[:2] == ["sh", "-c"]:
        return [shlex.split(part) for part in re.split(r"\|\||&&|;", argv[2]) if part.strip()]
    return [argv]


def test_every_build_file_and_copied_path_exists():
    for name, svc in _services().items():
        if "build" in svc:
            ctx = (COMPOSE.parent / svc["build"]["context"]).resolve()
            dockerfile = ctx / svc["build"]["dockerfile"]
            assert ctx == ROOT and dockerfile.exists(), name
            for line in dockerfile.read_text().splitlines():
                if line.startswith("COPY "):
                    for src in line.split()[1:-1]:
                        assert (ctx / src).exists(), f"{dockerfile}: COPY {src} does not exist"
        else:
            assert svc["image"] in EXTERNAL_IMAGES, f"{name}: unpinned or unknown image {svc['image']}"


def test_every_command_exists():
    from recsys_pretrain.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    cli_commands = set(sub.choices)
    scripts = {"recsys-pretrain", "mlflow", "prefect", "python", "true"}
    for name, svc in _services().items():
        for argv in _commands(svc.get("command", [])) if "command" in svc else []:
            assert argv[0] in scripts, f"{name}: unknown program {argv[0]}"
            if argv[0] == "recsys-pretrain":
                assert argv[1] in cli_commands, f"{name}: recsys-pretrain has no command {argv[1]}"
                args = {a for a in argv[2:] if a.startswith("--")}
                known = {o for a in sub.choices[argv[1]]._actions for o in a.option_strings}
                assert args <= known, f"{name}: unknown options {args - known}"
            if argv[:2] == ["prefect", "deploy"]:
                spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
                for dep in spec["deployments"]:
                    path, fn = dep["entrypoint"].split(":")
                    assert f"def {fn}(" in (ROOT / path).read_text()
                    assert (ROOT / dep["parameters"]["config"]).exists()


def _tool_env() -> set[str]:
    """Environment variables MLflow (its settings and its CLI's options) and Prefect (its settings) read."""
    import mlflow
    import mlflow.environment_variables as mev
    from prefect.settings import Settings
    from prefect.settings.legacy import _get_valid_setting_names

    names = {v.name for v in vars(mev).values() if isinstance(getattr(v, "name", None), str)}
    cli = Path(mlflow.__file__).parent / "cli" / "__init__.py"
    names |= set(re.findall(r'envvar="(\w+)"', cli.read_text()))
    return names | set(_get_valid_setting_names(Settings))


def test_every_environment_variable_is_read_somewhere():
    import prefect.settings

    code = "\n".join(p.read_text() for p in [*ROOT.glob("recsys_pretrain/**/*.py"), *ROOT.glob("flows/*.py")])
    tools = _tool_env()
    ui = yaml.safe_load(COMPOSE_UI.read_text())["services"]
    for name, svc in [*_services().items(), *ui.items()]:
        for var in svc.get("environment", {}):
            known = var in code or var in IMAGE_ENV or hasattr(prefect.settings, var) or var in tools
            assert known, f"{name}: {var} is read by nothing in the project or its tools"


def test_services_are_wired_and_health_checked():
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for vol in svc.get("volumes", []):
            assert vol.split(":")[0] in spec["volumes"], f"{name}: undeclared volume {vol}"
        assert "healthcheck" in svc, f"{name} has no health check"
    assert LONG_RUNNING <= set(services)
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql")
    for name in LONG_RUNNING:
        assert services[name].get("restart") in ("always", "unless-stopped"), f"{name} is not restarted"


def _env_example() -> dict[str, str]:
    lines = [ln.strip() for ln in ENV_EXAMPLE.read_text().splitlines()]
    return dict(ln.split("=", 1) for ln in lines if ln and not ln.startswith("#"))


def test_secrets_come_from_the_uncommitted_env_file():
    text = "\n".join(ln for ln in COMPOSE.read_text().splitlines() if not ln.lstrip().startswith("#"))
    example = _env_example()
    used = {m.group(1): m.group(2) for m in INTERPOLATION.finditer(text)}
    assert used and set(used) <= set(example), f"not in docker/.env.example: {set(used) - set(example)}"
    for var, op in used.items():
        if SECRET.search(var):
            assert op == ":?", f"${{{var}}} has a default or may be empty: compose must refuse to start without it"
            assert example[var] == "", f"docker/.env.example commits a value for the secret {var}"
    for name, svc in _services().items():
        for var, value in (svc.get("environment") or {}).items():
            value = str(value)
            if SECRET.search(var) or CREDENTIALS_IN_URI.search(value):  # a secret, or a URI holding one
                assert INTERPOLATION.search(value), f"{name}: {var} is written in the file, not taken from .env"
        for argv in _commands(svc.get("command", [])) if "command" in svc else []:
            joined = " ".join(argv)
            assert not CREDENTIALS_IN_URI.search(joined) and "${" not in joined and "--backend-store-uri" not in joined, (
                f"{name}: a secret on the command line ({joined}): `ps` shows it to every user of the host")
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=ROOT, check=False)
    assert ignored.returncode == 0, "docker/.env is not git-ignored"
    assert subprocess.run(["git", "check-ignore", "-q", "docker/.env.example"], cwd=ROOT, check=False).returncode


def test_only_the_service_is_published_and_everything_asks_for_credentials():
    services = _services()
    assert [n for n, s in services.items() if s.get("ports")] == ["serve"]
    assert services["mlflow"]["expose"] and services["prefect-server"]["expose"]
    for name, svc in yaml.safe_load(COMPOSE_UI.read_text())["services"].items():
        assert name in services and all(str(p).startswith("127.0.0.1:") for p in svc["ports"]), name
    # MLflow: its basic-auth app, with the package extra it needs; its clients log in
    argv = services["mlflow"]["command"]
    assert argv[argv.index("--app-name") + 1] == "basic-auth"
    assert '"mlflow[auth]"' in (ROOT / "docker" / "Dockerfile").read_text()
    assert {"MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
            "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= set(services["mlflow"]["environment"])
    assert "PREFECT_SERVER_API_AUTH_STRING" in services["prefect-server"]["environment"]
    for name in ("prefect-worker", "serve"):
        env = services[name]["environment"]
        assert {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(env), name
    assert "PREFECT_API_AUTH_STRING" in services["prefect-worker"]["environment"]
    # the service: its admin token from the env file (without one, a non-loopback bind has no admin routes)
    assert "RECSYS_ADMIN_TOKEN" in services["serve"]["environment"]


def _compose_cli() -> list[str] | None:
    """`docker compose` (v2), else the older `docker-compose` (v1), else None."""
    if shutil.which("docker"):
        v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if v2.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def _compose_config(tmp_path, cli, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`compose config` on copies of the files beside a docker/.env holding `env` (the real docker/.env,
    if there is one, is never touched)."""
    (tmp_path / "docker").mkdir(exist_ok=True)
    text = COMPOSE.read_text()
    if cli == ["docker-compose"]:  # v1 predates the top-level `name`
        text = re.sub(r"(?m)^name:.*$", "", text)
    (tmp_path / "docker" / "compose.yaml").write_text(text)
    for f in ("compose.ui.yaml", "Dockerfile"):
        shutil.copy(ROOT / "docker" / f, tmp_path / "docker" / f)
    (tmp_path / "docker" / ".env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    files = ["-f", "docker/compose.yaml", "-f", "docker/compose.ui.yaml"]
    return subprocess.run([*cli, *files, "config"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          check=False)


def test_compose_config_accepts_the_file_with_an_env_file(tmp_path):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no docker compose CLI here")
    env = {k: v or (f"admin:{secrets.token_hex(8)}" if k == "PREFECT_AUTH_STRING" else secrets.token_hex(16))
           for k, v in _env_example().items()}
    out = _compose_config(tmp_path, cli, env)
    assert out.returncode == 0, out.stderr
    spec = yaml.safe_load(out.stdout)
    svc = spec["services"]
    assert svc["serve"]["environment"]["RECSYS_ADMIN_TOKEN"] == env["RECSYS_ADMIN_TOKEN"]
    assert svc["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"] == (
        f"postgresql+psycopg2://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/mlflow")
    for name, s in svc.items():
        assert env["POSTGRES_PASSWORD"] not in " ".join(map(str, s.get("command") or [])), name
    # a missing secret stops compose, naming it
    out = _compose_config(tmp_path, cli, {**env, "RECSYS_ADMIN_TOKEN": ""})
    assert out.returncode != 0 and "RECSYS_ADMIN_TOKEN" in out.stderr


def test_the_service_runs_unprivileged_and_only_reads_the_data():
    services = _services()
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    users = [ln.split()[1] for ln in dockerfile.splitlines() if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as root"
    # the mount points of the named volumes belong to that user, so new volumes start out writable by it
    user = users[-1].split(":")[0]
    for path in ("/app/data", "/mlartifacts", "/mlflow-auth"):
        assert re.search(rf"chown {user}:\S+ [^\n]*{re.escape(path)}\b", dockerfile), path
    serve = services["serve"]
    assert serve.get("user") in (None, user), "the public service overrides the image's user"
    data = [v for v in serve["volumes"] if v.split(":")[0] == "data"]
    assert data == ["data:/app/data:ro"], data
    assert all(v.endswith(":ro") for v in serve["volumes"]), serve["volumes"]
    # its downloads go to a temp directory: a tmpfs, writable by any user
    assert any(str(t).split(":")[0] == "/tmp" for t in serve.get("tmpfs", [])), "serve has no writable /tmp"
    # root only where a volume an older image created as root must be written
    writers = {n for n, s in services.items() if "build" in s and s.get("user") in ("root", "0")}
    assert writers <= {"prefect-worker", "mlflow"}, writers
    for name in writers:
        assert any(":ro" not in v for v in services[name].get("volumes", [])), name


def test_the_service_does_not_log_in_to_mlflow_as_the_admin():
    example = _env_example()
    assert example["MLFLOW_SERVE_USERNAME"] == "", "docker/.env.example names an MLflow user for the service"
    assert example["MLFLOW_SERVE_USERNAME"] != example["MLFLOW_TRACKING_USERNAME"]
    text = ENV_EXAMPLE.read_text()
    assert re.search(r"read-only MLflow user must be created", text)
    env = _services()["serve"]["environment"]
    assert "MLFLOW_SERVE_USERNAME:?" in env["MLFLOW_TRACKING_USERNAME"]  # compose refuses to start without it


def _health_url(svc: dict) -> str:
    """The URL a health check's `python -c "...urlopen('URL'...)"` opens."""
    test = svc["healthcheck"]["test"]
    match = re.search(r"urlopen\('([^']+)'", " ".join(test) if isinstance(test, list) else test)
    assert match, test
    return match.group(1)


def _seconds(value: str) -> float:
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", value))


def test_the_service_follows_what_the_flow_publishes_and_its_health_check_is_readiness():
    """serve: follows the pointer file the worker's flow writes (same path on the shared volume), restarts
    unless stopped, health-checked on the readiness route with a start period; /health is liveness."""
    from recsys_pretrain.config import load_config

    services = _services()
    serve, worker = services["serve"], services["prefect-worker"]
    (argv,) = _commands(serve["command"])
    assert "--model" not in argv, "the service follows the pointer file, not an alias resolved once at start"
    pointer = argv[argv.index("--index") + 1]
    # where the deployment's flow publishes: prefect.yaml's config, run in its pull step's working directory
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (workdir,) = [s["prefect.deployments.steps.set_working_directory"]["directory"] for s in spec["pull"]]
    (dep,) = spec["deployments"]
    cfg = load_config(str(ROOT / dep["parameters"]["config"]))
    assert pointer == f"{workdir}/{cfg.data_dir}/{cfg.name}/serving/current.json"
    # one volume, mounted where both see the same absolute paths (the pointer names the index directory)
    mount = f"{workdir}/{cfg.data_dir}"
    assert f"data:{mount}" in worker["volumes"] and f"data:{mount}:ro" in serve["volumes"]
    for name in ("serve", "prefect-worker"):
        assert services[name]["restart"] == "unless-stopped", name
    # readiness, not liveness, with time to load a published model at start
    check = serve["healthcheck"]
    assert _health_url(serve) == "http://localhost:8000/ready"
    assert _seconds(check["start_period"]) >= 60 and _seconds(check["timeout"]) >= 5
    # the worker's health server is on, where its health check looks
    wargv = _commands(worker["command"])[-1]
    assert wargv[:3] == ["prefect", "worker", "start"] and "--with-healthcheck" in wargv
    port = worker["environment"]["PREFECT_WORKER_WEBSERVER_PORT"]
    assert _health_url(worker) == f"http://{worker['environment']['PREFECT_WORKER_WEBSERVER_HOST']}:{port}/health"
    assert _seconds(worker["healthcheck"]["start_period"]) >= 60
    # `prefect deploy` in a container has no one to answer its prompts
    assert any(a[:2] == ["prefect", "deploy"] and "--no-prompt" in a for a in _commands(worker["command"]))


def test_the_service_routes_the_checks_use_exist():
    from recsys_pretrain.config import ServeConfig
    from recsys_pretrain.serve import create_app, make_holder

    holder = make_holder(ServeConfig(index="/nonexistent/serving/current.json", reload_poll_s=0))
    try:
        paths = {r.path for r in create_app(holder, ServeConfig()).routes}
    finally:
        holder.close()
    assert {"/health", "/ready"} <= paths
