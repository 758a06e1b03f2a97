"""Shared fixtures: a private MLflow database, the embedded data, and shrunken params."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tactic.config import merged, parse_params
from tactic.data import fashion_mnist

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


# The tests that run the pipeline through subprocesses, longest first.
LONGEST = ("test_deployment_end_to_end", "test_results_are_the_same_with_and_without_the_server",
           "test_dvc_repro_runs_the_grid_then_does_nothing")


def pytest_collection_modifyitems(items):
    """Order for `-n 2 --dist loadgroup`, which hands each worker two tests at a time (no test is in a
    group): the two longest go one to each worker, the test queued behind the longest is a quick one, and the
    other slow tests come before the quick ones so that none of them is left running alone at the end."""
    def rank(item):
        if item.name in LONGEST:
            return LONGEST.index(item.name)
        return 3 if item.get_closest_marker("slow") else 4

    items.sort(key=rank)
    quick = next((i for i, item in enumerate(items) if rank(item) == 4), None)
    if quick is not None:
        items.insert(2, items.pop(quick))


def pytest_configure(config):
    # Two workers on two cores: one torch thread each in-process (stage subprocesses set their own).
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def repo_params(overrides: dict) -> dict:
    import yaml

    return merged(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)


@pytest.fixture(autouse=True, scope="session")
def _mlflow_db(tmp_path_factory):
    """Keep test runs out of the project's own tracking database."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    yield f"sqlite:///{db}"
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="session")
def fmnist_root():
    if not Path(FMNIST_ROOT, fashion_mnist.FILES["train"][0]).is_file():
        pytest.fail(f"embedded data missing at {FMNIST_ROOT}: `make test` installs it (apt-get install dataset-fashion-mnist)")
    return FMNIST_ROOT


@pytest.fixture(scope="session")
def tiny_params():
    return parse_params(TINY)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, fmnist_root):
    """The tiny profile's prepared data, made once per session."""
    from tactic.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(parse_params(TINY).prepare, out)
    return out
