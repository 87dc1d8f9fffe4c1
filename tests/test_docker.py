"""No Docker engine here: check that everything docker/compose.yaml names exists in the project."""

import re
import shlex

import yaml

from tests.conftest import ROOT

COMPOSE = ROOT / "docker" / "compose.yaml"
EXTERNAL_IMAGES = {"postgres:16", "prefecthq/prefect:3-python3.11"}
IMAGE_ENV = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}  # read by the postgres image itself


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


def test_every_environment_variable_is_read_somewhere():
    import prefect.settings

    code = "\n".join(p.read_text() for p in [*ROOT.glob("recsys_pretrain/**/*.py"), *ROOT.glob("flows/*.py")])
    for name, svc in _services().items():
        for var in svc.get("environment", {}):
            known = var in code or var in IMAGE_ENV or hasattr(prefect.settings, var)
            assert known, f"{name}: {var} is read by nothing in the project or its tools"


def test_services_are_wired_and_health_checked():
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for vol in svc.get("volumes", []):
            assert vol.split(":")[0] in spec["volumes"], f"{name}: undeclared volume {vol}"
        if name != "prefect-worker":
            assert "healthcheck" in svc, f"{name} has no health check"
    assert {"postgres", "mlflow", "prefect-server", "prefect-worker", "serve"} <= set(services)
    assert "postgresql" in " ".join(services["mlflow"]["command"])
