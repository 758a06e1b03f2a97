"""Orchestration overhead: the same profile through `dvc repro` and through the Prefect flow on Dask.

    python benchmarks/orchestration.py [--profile smoke] [--workers 2]

Runs in two fresh copies of the repo (so neither finds the other's outputs), first `dvc repro`
(serial, DVC alone), then the `tactic` flow (a temporary Prefect server, a local Dask cluster),
and prints both wall times and their ratio, and how many training stages the flow ran at once (the
most MLflow stage runs open at the same moment). On the smoke profile the ratio shows what Prefect and
Dask add; on the default profile, whether the fan-out over the cores beats DVC's serial run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tactic.profiles import resolve_params
from tactic.io import copy_tracked

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def copy_repo(dest: Path, profile: str) -> Path:
    copy_tracked(ROOT, dest)
    (dest / "params.yaml").write_text(yaml.safe_dump(resolve_params(ROOT, profile), sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def timed(cmd, cwd, env) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def most_at_once(db: str) -> int:
    """The most training-stage MLflow runs open at one moment: > 1 means the flow fanned out."""
    import mlflow

    mlflow.set_tracking_uri(db)
    runs = mlflow.search_runs(experiment_names=["tactic"], filter_string="tags.dvc_stage LIKE 'train_%'")
    events = sorted([(t.value, 1) for t in runs["start_time"]] + [(t.value, -1) for t in runs["end_time"]])
    open_, most = 0, 0
    for _, step in events:
        open_ += step
        most = max(most, open_)
    return most


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PREFECT_HOME": str(tmp / "prefect"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TACTIC_DASK_WORKERS": str(args.workers)}
        base.pop("PREFECT_API_URL", None)  # a temporary local server, started by the flow itself
        dvc_repo = copy_repo(tmp / "dvc", args.profile)
        t_dvc = timed([BIN / "dvc", "repro"], dvc_repo, {**base, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/a.db"})
        flow_repo = copy_repo(tmp / "flow", args.profile)
        env = {**base, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/b.db", "PYTHONPATH": str(flow_repo)}
        t_flow = timed([sys.executable, "-m", "pipeline.flow", "--workers", str(args.workers)], flow_repo, env)
        print(f"profile {args.profile}: dvc repro {t_dvc:.1f} s, Prefect flow on Dask ({args.workers} workers) {t_flow:.1f} s, "
              f"ratio flow/dvc {t_flow / t_dvc:.2f}; training stages at once in the flow: at most "
              f"{most_at_once(env['MLFLOW_TRACKING_URI'])}")


if __name__ == "__main__":
    main()
