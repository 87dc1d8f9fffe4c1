import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("MPLBACKEND", "Agg")
# Prefect: its home inside the project, no analytics, and time for its local API to start on 2 cores.
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


@pytest.fixture
def write(tmp_path):
    """write("name.csv", text) -> path of a file in the test's temp dir."""

    def _write(name: str, text: str | bytes) -> Path:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            p.write_bytes(text)
        else:
            p.write_text(text)
        return p

    return _write


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory):
    """A small synthetic log, ingested and prepared once per test session: (raw csv, ingested, prepared, truth)."""
    from recsys_pretrain.config import IngestConfig, PrepareConfig
    from recsys_pretrain.data.ingest import ingest
    from recsys_pretrain.data.prepare import prepare
    from recsys_pretrain.data.synthetic import SynthConfig, write_synthetic

    root = tmp_path_factory.mktemp("tiny")
    raw, truth = root / "events.csv", root / "truth.npz"
    write_synthetic(SynthConfig(n_users=150, n_items=80, n_categories=5, events_per_user=40, seed=1), raw,
                    truth=truth)
    ingest([raw], root / "ingested", IngestConfig(id_type="int"))
    prepare(root / "ingested", root / "prepared", PrepareConfig())
    return {"raw": raw, "ingested": root / "ingested", "prepared": root / "prepared", "truth": truth}


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    """A real MLflow SQLite store in the test's temp dir (the env var MLflow sets is restored after)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
