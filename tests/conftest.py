"""Shared fixtures: a private MLflow database, the embedded data, and shrunken params."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tactic.config import parse_params
from tactic.data import fashion_mnist
from tests.helpers import FMNIST_ROOT, TINY

# The DVC repositories tests make with `dvc init` would otherwise report usage: every DVC command there
# started a `dvc daemon analytics` process (25 in a suite run, ~14 CPU-seconds) that tries the network.
os.environ["DVC_NO_ANALYTICS"] = "1"

# The tests that run the pipeline through subprocesses, longest first.
LONGEST = ("test_a_failing_stage_fails_the_flow_run_with_its_own_message",
           "test_kfp_local_runs_every_stage_after_its_needs_and_gives_dvc_repros_table",  # the scaling group: ~110 s
           "test_results_are_the_same_with_and_without_the_server", "test_dvc_repro_runs_the_grid_then_does_nothing")
QUICK = len(LONGEST) + 1  # the rank of a test that is not slow


def pytest_collection_modifyitems(items):
    """Order for `-n 2 --dist loadgroup`, which hands each worker two tests at a time (the tests of an
    xdist group go to one worker together, and stay together here so that their module fixture is
    made once): the two longest go one to each worker, the test queued behind the longest is a quick
    one, and the other slow tests come before the quick ones so that none of them is left running
    alone at the end."""
    def rank(item):
        if item.name in LONGEST:
            return LONGEST.index(item.name)
        return len(LONGEST) if item.get_closest_marker("slow") else QUICK

    units = {}  # group (or the test itself) -> its tests in collection order
    for item in items:
        group = item.get_closest_marker("xdist_group")
        units.setdefault(group.args[0] if group else item.nodeid, []).append(item)
    ordered = sorted(units.values(), key=lambda unit: min(map(rank, unit)))
    quick = next((i for i, unit in enumerate(ordered) if min(map(rank, unit)) == QUICK), None)
    if quick is not None and quick > 2:
        ordered.insert(2, ordered.pop(quick))
    items[:] = [item for unit in ordered for item in unit]


def pytest_configure(config):
    # Two workers on two cores: one torch thread each in-process (stage subprocesses set their own).
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


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
