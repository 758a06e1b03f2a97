"""MLflow: one experiment, one run per stage execution, one tracking database per project.

The tracking URI defaults to `sqlite:///<repo root>/mlflow.db` as an absolute path, because DVC,
Prefect workers and tests all change the current directory; `MLFLOW_TRACKING_URI` overrides it.
A stage launched by a flow finds the flow's parent run in `TACTIC_PARENT_RUN_ID` and nests under it.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import subprocess
import time
from pathlib import Path

from tactic.config import ROOT
from tactic.io import process_token, token_alive

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
    experiment = mlflow.set_experiment(EXPERIMENT)
    # The UI's saved view of the runs (tactic.mlflow_view: columns, a bpp-vs-accuracy chart) for the task of
    # params.yaml, written once per database, when missing, so a view replaced in the UI is kept. A failed
    # write fails no stage: the view is a convenience, and the next setup() writes it.
    from tactic import mlflow_view

    task = mlflow_view.current_task()
    if mlflow_view.view_tag_key(task) not in experiment.tags:
        try:
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, *mlflow_view.view_tag(task))
        except Exception as err:  # noqa: BLE001
            logging.getLogger(__name__).warning("MLflow saved view not written: %s", err)
    return mlflow


def _process_tags() -> dict:
    return {"tactic.host": socket.gethostname(), "tactic.process": process_token()}


def orphan_reason(run) -> str | None:
    """Why a RUNNING run can no longer end by itself (its process on this host is gone), else None.
    Runs from other hosts, and runs without process tags, are never judged."""
    tags = run.data.tags
    token = tags.get("tactic.process")
    if run.info.status != "RUNNING" or tags.get("tactic.host") != socket.gethostname() or not token or token_alive(token):
        return None
    return f"process {token.partition('-')[0]} on {tags['tactic.host']} ended without closing its run (killed)"


def close_orphans(client, experiment_id: str, closed_by: str) -> list:
    """Mark KILLED every RUNNING run of the experiment whose process is gone; returns those runs.

    A stage killed by SIGKILL (or an out-of-memory kill, or a lost machine) cannot end its own MLflow
    run; the next stage (or `tactic runs clean`) does, so no run shows RUNNING forever."""
    runs = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=5000)
    closed = []
    for run in runs:
        reason = orphan_reason(run)
        if reason:
            client.set_tag(run.info.run_id, "failure_reason", f"{reason}; closed by {closed_by}")
            client.set_terminated(run.info.run_id, "KILLED", end_time=int(time.time() * 1000))
            closed.append(run)
    return closed


@contextlib.contextmanager
def start_run(name: str, stage: str | None, params: dict, run_id: str | None = None, tags: dict | None = None):
    """An MLflow run tagged with the git commit, DVC stage and the process that owns it; `run_id`
    resumes an interrupted one. Runs left RUNNING by killed processes are closed first. The run ends
    FINISHED, FAILED (an error, its reason tagged) or KILLED (Ctrl-C, SIGTERM)."""
    mlflow = setup()
    client = mlflow.MlflowClient()
    close_orphans(client, mlflow.get_experiment_by_name(EXPERIMENT).experiment_id, f"{stage or name} (pid {os.getpid()})")
    tags = {"git_commit": git_commit(), "tactic.key": name, **({"dvc_stage": stage} if stage else {}), **_process_tags(),
            **(tags or {})}
    parent = os.environ.get("TACTIC_PARENT_RUN_ID")
    if parent:
        tags["mlflow.parentRunId"] = parent
    # System metrics (CPU, memory, disk; GPU where pynvml finds one) every 2 s unless set otherwise:
    # a stage lasts seconds to minutes, MLflow's default of 10 s would record next to nothing.
    os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "2")
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start/stop lines, every stage
    system_metrics = os.environ.get("TACTIC_SYSTEM_METRICS", "1") != "0"
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else name, tags=tags, log_system_metrics=system_metrics) as run:
        try:  # from here on an interruption (even one during log_params) ends the run KILLED, with its reason
            if run_id is None:  # a resumed run has its params, and the tags above make it this process's
                mlflow.log_params(params)
            elif "failure_reason" in run.data.tags:  # it resumes what was killed: say so, it is no failure now
                mlflow.set_tag("tactic.resumed_after", run.data.tags["failure_reason"])
                client.delete_tag(run.info.run_id, "failure_reason")
            yield run
        except BaseException as err:  # say why where users look; interrupted runs end KILLED, not FAILED
            mlflow.set_tag("failure_reason", f"{type(err).__name__}: {err}"[:5000])
            if isinstance(err, KeyboardInterrupt):
                mlflow.end_run("KILLED")
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


def set_tag(key: str, value: str) -> None:
    import mlflow

    mlflow.set_tag(key, value)


def log_figure(figure, name: str) -> None:
    import mlflow

    mlflow.log_figure(figure, name)


def log_artifact(path: str | Path) -> None:
    import mlflow

    mlflow.log_artifact(str(path))
