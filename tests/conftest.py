"""Shared fixtures: a private MLflow database, the embedded data, and shrunken params."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tactic.config import parse_params
from tactic.data import fashion_mnist
from tests.helpers import FMNIST_ROOT, ONE_POINT, REPO, TINY, copy_repo, fresh_mlflow, results_of

# The DVC repositories tests make with `dvc init` would otherwise report usage: every DVC command there
# started a `dvc daemon analytics` process (25 in a suite run, ~14 CPU-seconds) that tries the network.
os.environ["DVC_NO_ANALYTICS"] = "1"

# The tests that run the pipeline through subprocesses, longest first.
LONGEST = ("test_a_failing_stage_fails_the_flow_run_with_its_own_message",  # the Prefect deployment's group
           "test_kfp_local_runs_every_stage_after_its_needs_and_gives_the_plain_runs_results")  # "e2e": ~80 s
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
    uri = fresh_mlflow(tmp_path_factory.mktemp("mlflow") / "mlflow.db")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
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


@pytest.fixture(scope="session")
def xdg_cache(tmp_path_factory) -> Path:
    """One XDG cache for the whole suite run, both xdist workers: the first Prefect server that
    migrates a new database keeps its template there (pipeline/server.py), and every later one seeds
    from it (5.8 s to start instead of 11.2), as on a user's machine after the first time; never the
    user's own cache, so each suite run migrates once for real."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "xdg-cache"


@pytest.fixture(scope="session")  # not "module": an xdist worker tears those down between modules
def server():
    """A stage server of its own (tests/test_stage_server.py), whose `status` counts what it served:
    (env for commands it should serve, its private folder)."""
    # A short private folder: the socket lives there (Unix socket paths are limited to ~100 bytes).
    # Stopped at teardown; its idle exit (900 s) only cleans up after a killed suite: with 120 s, the
    # e2e group's other tests outlasted it on a slow machine and the later server tests found none.
    home = Path(tempfile.mkdtemp(prefix="tss", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "TACTIC_STAGE_SERVER")}
    env.update(TMPDIR=str(home), PYTHONPATH=str(REPO))
    started = subprocess.run([sys.executable, "-m", "stages.server", "start", "--wait", "120", "--idle", "900"], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=150)
    assert started.returncode == 0 and "started" in started.stdout, started.stdout + started.stderr
    yield env, home
    subprocess.run([sys.executable, "-m", "stages.server", "stop"], cwd=REPO, env=env, timeout=30)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def reference(tmp_path_factory, fmnist_root) -> tuple[str, list]:
    """ONE_POINT's stages run as plainly as can be: the commands of dvc.yaml in DVC's order, each
    as `python -m` runs it (its module's `cli.run(main)` on its argv) but in this process, one after
    the other (no stage server, no DVC, no orchestrator, no process start): the table and rows that
    every way of running them must give (`results_of`). One run for the tests of the "e2e" group."""
    import contextlib
    import importlib

    import mlflow
    from dvc.repo import Repo

    from pipeline.stages import dvc_graph
    from stages import cli

    tmp = tmp_path_factory.mktemp("reference")
    repo = copy_repo(tmp / "repo", ONE_POINT)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)  # .dvc/ came with the copy
    with Repo(str(repo)) as dvc:
        commands = {stage.name: stage.cmd for stage in dvc.index.stages}
    env = {"TACTIC_STAGE_SERVER": "0", "MLFLOW_TRACKING_URI": fresh_mlflow(tmp / "mlflow.db")}
    saved, argv = {k: os.environ.get(k) for k in env}, sys.argv
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}  # a stage sets its own
    os.environ.update(env)
    try:
        with contextlib.chdir(repo):
            for name in dvc_graph(repo):
                module, *args = commands[name].split()[2:]  # python -m <module> ...
                # The copy's params: a stage's default is those of the repo its `tactic` was imported from
                sys.argv = [module, *args, "--params", "params.yaml"]
                try:
                    cli.run(importlib.import_module(module).main)
                except SystemExit as stop:
                    assert not stop.code, f"{commands[name]} exited {stop.code}"
    finally:
        sys.argv = argv
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        if os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])  # the stages pointed MLflow at theirs
    return results_of(repo)
