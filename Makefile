# Two commands for a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export MPLBACKEND := Agg
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false

.PHONY: run test lint install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch is pinned to the CPU wheel (==2.13.0); pip, not uv/poetry, so the local wheel is found.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The whole nightly flow once on the embedded default (generated log, Prefect's local API, MLflow in
# data/mlflow.db); it ends by printing the MLflow UI command, the champions' metrics and a sample answer.
run: $(STAMP)
	$(PY) -m flows.nightly --config configs/default.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check recsys_pretrain flows tests benchmarks

test: $(STAMP) lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
