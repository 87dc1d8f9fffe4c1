"""Serve the nightly flow as a deployment on a cron schedule (default: every night at 02:00 UTC).

    python -m flows.deploy --config configs/default.yaml     # long-running: runs the flow on schedule

For a Prefect server with a process work pool, `prefect.yaml` describes the same deployment:
`prefect deploy --name nightly` then `prefect worker start --pool default`.
"""

from __future__ import annotations

import argparse

from flows.nightly import nightly
from recsys_pretrain.config import load_config


def deployment_kwargs(config: str) -> dict:
    cfg = load_config(config)
    return {"name": "nightly", "cron": cfg.flow.schedule_cron, "parameters": {"config": config},
            "tags": ["recsys-pretrain", "nightly"], "description": "Nightly pretraining, promotion and index publish",
            "concurrency_limit": 1}  # a night that overruns is not joined by the next one


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/default.yaml")
    args = ap.parse_args(argv)
    nightly.serve(**deployment_kwargs(args.config))


if __name__ == "__main__":
    main()
