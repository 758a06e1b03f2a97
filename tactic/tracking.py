"""MLflow: one experiment, one run per stage execution, one tracking database per project.

The tracking URI defaults to `sqlite:///<repo root>/mlflow.db` as an absolute path, because DVC,
Prefect workers and tests all change the current directory; `MLFLOW_TRACKING_URI` overrides it.
A stage launched by a flow finds the flow's parent run in `TACTIC_PARENT_RUN_ID` and nests under it.
"""
from __future__ import annotations

import contextlib
import math
import os
import subprocess
from pathlib import Path

from tactic.config import ROOT

EXPERIMENT = os.environ.get("TACTIC_EXPERIMENT", "tactic")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ROOT / 'mlflow.db'}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def setup():
    import logging

    import mlflow

    # MLflow's database migrations log at INFO on first use; they are not the user's concern.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(EXPERIMENT)
    return mlflow


@contextlib.contextmanager
def start_run(name: str, stage: str | None, params: dict, run_id: str | None = None, tags: dict | None = None):
    """An MLflow run tagged with the git commit and DVC stage; `run_id` resumes an interrupted one."""
    mlflow = setup()
    tags = {"git_commit": git_commit(), **({"dvc_stage": stage} if stage else {}), **(tags or {})}
    parent = os.environ.get("TACTIC_PARENT_RUN_ID")
    if parent:
        tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else name, tags=tags) as run:
        if run_id is None:
            mlflow.log_params(params)
        try:
            yield run
        except BaseException as err:  # the run ends FAILED (KILLED on Ctrl-C); say why where users look
            mlflow.set_tag("failure_reason", f"{type(err).__name__}: {err}"[:5000])
            raise


def log_metrics(metrics: dict, step: int | None = None) -> None:
    import mlflow

    values = {k: float(v) for k, v in metrics.items() if v is not None}
    finite = {k: v for k, v in values.items() if math.isfinite(v)}
    mlflow.log_metrics(finite, step=step)
    # MLflow stores NaN but its UI and search drop it: a non-finite value is a tag too, never lost.
    for k, v in values.items():
        if k not in finite:
            mlflow.set_tag(f"nonfinite.{k}", f"{v} at step {step}")


def log_artifact(path: str | Path) -> None:
    import mlflow

    mlflow.log_artifact(str(path))
