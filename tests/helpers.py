"""What several test modules share (tests import from here, never from each other)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

from tactic.config import merged
from tactic.data import fixtures
from tactic.io import copy_tracked

REPO = Path(__file__).resolve().parent.parent

# One torch thread in every stage process the tests start (params `threads: null` reads this): with two
# pytest workers and two Dask workers on two cores, more threads oversubscribe the cores, and OpenMP's
# spinning threads then slow every process down several times over.
os.environ.setdefault("TACTIC_THREADS", "1")
FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"

# A profile small enough for unit tests: seconds per training run on 2 cores.
TINY = {
    "seeds": [0],
    "betas": [0.03, 0.3],
    "threads": 1,
    "prepare": {"train_size": 300, "val_size": 100, "test_size": 100},
    "model": {"codec": {"N": 8, "M": 4}, "task": {"width": 8}},
    # ~90 codec steps: with 6 (1 epoch of 50) every codec point sat at chance with a 9 dB PSNR.
    "pretrain": {"epochs": 3, "batch_size": 10, "lr": 0.01},
    "train": {"epochs": 2, "batch_size": 16},
    "jpeg": {"qualities": [5, 50]},
    "evaluate": {"batch_size": 50},
}


def repo_params(overrides: dict) -> dict:
    return merged(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)


# The smoke profile (TINY's values) at one operating point per mode: 9 stages. Every test that runs
# the whole pipeline as a user does (`pipeline.repro --jobs`, the stage server, kfp.local, a Dask
# cluster, the Prefect deployment) runs these params, so one plain run is the reference for all.
ONE_POINT = repo_params({**TINY, "betas": [0.004], "jpeg": {"qualities": [5]}})


_MLFLOW_TEMPLATE: list[Path] = []  # this process's empty, migrated tracking database


def fresh_mlflow(db: Path) -> str:
    """A new MLflow tracking database at `db` (its URI): a copy of an empty one whose tables MLflow
    created once in this process. Creating them takes MLflow 1.4 s a database, and most tests that
    log want one of their own; what they test is what is logged, not MLflow's first use."""
    import atexit
    import shutil
    import tempfile

    if not _MLFLOW_TEMPLATE:
        from mlflow import MlflowClient

        folder = tempfile.mkdtemp(prefix="tactic-mlflow-")
        atexit.register(shutil.rmtree, folder, True)
        template = Path(folder) / "empty.db"
        MlflowClient(f"sqlite:///{template}").search_experiments()  # creates and migrates the tables
        _MLFLOW_TEMPLATE.append(template)
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_MLFLOW_TEMPLATE[0], db)
    return f"sqlite:///{db}"


def served(env: dict) -> int:
    """How many commands the stage server that `env` reaches has served."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", "stages.server", "status"], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    return yaml.safe_load(out.stdout)["served"]


def results_of(repo: Path) -> tuple[str, list]:
    """What a run of the pipeline computed: results/table.md and the rows of results/eval.json,
    without the one field that names where a row was logged (its MLflow run id)."""
    rows = json.loads((repo / "results/eval.json").read_text())
    for row in rows:
        row.pop("mlflow_run_id")
    return (repo / "results/table.md").read_text(), rows


BIN = Path(sys.executable).parent


def subprocess_env(db_uri):
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": db_uri, "PYTHONUNBUFFERED": "1"}


def dvc(repo: Path, *args: str) -> str:
    """The output of `dvc <args>` in `repo`, run in this process: the same command line as the CLI's,
    without the 2-3 s of starting DVC each time (a test that asks for every profile's graph pays it
    once)."""
    import contextlib
    import io

    from dvc.cli import main

    out = io.StringIO()
    with contextlib.chdir(repo), contextlib.redirect_stdout(out):
        status = main(list(args))
    assert status == 0, f"dvc {' '.join(args)} exited {status} in {repo}:\n{out.getvalue()[-2000:]}"
    return out.getvalue()


def grid_graph(p) -> dict[str, list[str]]:
    """The stages the grid (tactic/experiment/grid.py, what `evaluate` scores) implies for params `p`,
    each with the stages it needs, in a runnable order: what DVC's graph of dvc.yaml must be."""
    from tactic.experiment.grid import pretrain_runs, task_runs

    graph = {"prepare": [], "weights": []}  # `weights`: hashes of the files params name (stages/weights.py)
    for r in pretrain_runs(p):
        graph[r.stage] = ["prepare"] + (["weights"] if r.mode == "pretrain-hyperprior" else [])
    runs = task_runs(p)
    for r in runs:
        graph[r.stage] = ["prepare", "weights"] + ([r.codec_run.stage] if r.codec_run else [])
    graph["evaluate"] = [r.stage for r in runs]
    graph["report"] = ["evaluate"]
    return graph


def copy_repo(dest: Path, params: dict) -> Path:
    copy_tracked(REPO, dest)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


# dataset -> (fixture maker, its kwargs, prepare params beyond dataset/root)
CLASSIFICATION = {
    "minc-2500": (fixtures.minc, {"classes": 3}, {"classes": 3}),
    "resisc-45": (fixtures.resisc, {"classes": 3}, {"classes": 3}),
    "rsscn7": (fixtures.rsscn7, {}, {}),
    "imagenet-50": (fixtures.imagenet, {"classes": 3}, {"classes": 3}),
}
