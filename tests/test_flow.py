"""The Prefect flow: parameters, the stage graph, stage failures, and (slow) a real server and deployment."""
import contextlib
import json
import os
import random
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest
import yaml

from tactic.profiles import resolve_params, write_params
from pipeline.stages import StageFailed, _reach, alone, dvc_graph, run_dvc_stage, stage_env
from tactic.config import ParamsError, parse_params
from tests.helpers import BIN, REPO, copy_repo, dvc, fresh_mlflow, grid_graph, repo_params


def test_overrides_are_validated_before_anything_runs():
    raw = resolve_params(REPO, profile="smoke", seeds=[3, 4], params={"train": {"alpha": 0.5}})
    p = parse_params(raw)
    assert p.seeds == [3, 4] and p.train.alpha == 0.5 and p.prepare.train_size == 300
    with pytest.raises(ParamsError, match="train.alpah: unknown key"):
        resolve_params(REPO, params={"train": {"alpah": 0.5}})
    with pytest.raises(ParamsError, match=r"betas.0: Input should be greater than or equal to 0"):
        resolve_params(REPO, betas=[-1.0])
    with pytest.raises(ParamsError, match=r"profile: unknown 'fast'; one of \[.*'default'.*'smoke'.*\]"):
        resolve_params(REPO, profile="fast")


def test_write_params_keeps_comments(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("# top comment\nseeds: [0, 1, 2]  # seeds\ntrain:\n  lr: 0.001\n")
    write_params(f, {"seeds": [7], "train": {"lr": 0.001}})
    text = f.read_text()
    assert "# top comment" in text and "# seeds" in text and yaml.safe_load(text)["seeds"] == [7]


SEGMENTATION_RUN = {"betas": [0.004], "params": {
    "jpeg": {"qualities": [5]}, "prepare": {"dataset": "fashion-mnist-canvases", "train_size": 60, "val_size": 20, "test_size": 20},
    "model": {"task": {"task": "segmentation", "arch": "small-fcn", "width": 8}}}}
LATENT_RUN = {"betas": [], "params": {
    "jpeg": {"qualities": []}, "prepare": {"dataset": "fashion-mnist", "size": 64, "train_size": 60, "val_size": 20, "test_size": 20},
    "model": {"task": {"task": "classification", "arch": "resnet18"}},
    "latent": {"qualities": [1], "N": 8, "M": 12, "pretrain": {"epochs": 1, "batch_size": 20}, "train": {"epochs": 1, "batch_size": 20}}}}


@pytest.mark.parametrize("extra", [{}, SEGMENTATION_RUN, LATENT_RUN], ids=["classification", "segmentation", "latent"])
def test_stage_graph_matches_dvc_yaml(tmp_path, extra):
    """The flow runs DVC's graph (`dvc_graph`): exactly the stages of the grid, which `evaluate`
    scores, each after what it needs, for every task and mode. With the end-to-end deployment test
    (classification) this stands for running the others through Prefect."""
    raw = resolve_params(REPO, profile="smoke", betas=extra["betas"], params=extra["params"]) if extra else repo_params({})
    repo = copy_repo(tmp_path / "repo", raw)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)  # .dvc/ came with the copy
    graph = dvc_graph(repo)
    assert set(graph) == set(dvc(repo, "stage", "list", "--name-only").split())
    # the same order: DVC names more direct edges (evaluate reads prepare's and pretrain's outputs itself)
    assert _reach(graph)[0] == _reach(grid_graph(parse_params(raw)))[0]
    order = list(graph)
    assert all(order.index(n) < order.index(s) for s, needs in graph.items() for n in needs)
    assert alone(graph) == {"evaluate", "report"}  # the stages the flow gives every core (prepare runs beside weights)
    if not extra:
        assert graph["train_aware@0.1-1"] == sorted(["prepare", "weights", "pretrain@0.1-1"])
    elif extra is LATENT_RUN:
        assert graph["train_latent_joint@1-0"] == sorted(["prepare", "weights", "pretrain_hyperprior@1-0"]) and "train_aware@0.004-0" not in graph
    else:
        assert graph["train_aware@0.004-0"] == sorted(["prepare", "weights", "pretrain@0.004-0"]) and graph["train_jpeg@5-0"] == ["prepare", "weights"]


def test_lock_conflicts_are_retried_other_failures_are_not(tmp_path):
    counter = tmp_path / "n"
    script = ("import pathlib,sys; f=pathlib.Path(sys.argv[1]); n=int(f.read_text()) if f.exists() else 0; f.write_text(str(n+1));"
              "sys.exit(0) if n >= 2 else (print('ERROR: Unable to acquire lock. Most likely another DVC process is running'), sys.exit(1))")
    status, _ = run_dvc_stage("s", tmp_path, dict(os.environ), command=[sys.executable, "-c", script, str(counter)])
    assert status == "ran" and counter.read_text() == "3"
    fail = "import sys; print('\\n'.join(f'line {i}' for i in range(50))); print('boom: the real cause', file=sys.stderr); sys.exit(3)"
    with pytest.raises(StageFailed) as err:
        run_dvc_stage("train_x@0", tmp_path, dict(os.environ), command=[sys.executable, "-c", fail])
    assert "stage train_x@0 failed (exit 3)" in str(err.value) and "boom: the real cause" in str(err.value)
    assert "line 10" not in str(err.value)  # the end of the output, not all of it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    """The Prefect API has what `url` names (asked over HTTP: a `prefect` command costs ~2 s of imports a try)."""
    import urllib.request

    try:
        return urllib.request.urlopen(url, timeout=5).status == 200
    except OSError:  # URLError and HTTPError (404 until the deployment exists) are OSErrors
        return False


def _wait_for(check, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _deployment_run(env, repo, *args) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "prefect", "deployment", "run", "tactic/full", *args, "--watch", "--watch-timeout", "600"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=700)


def _task_runs(env, flow_run_id) -> dict:
    """{task name: (start, end)} of a flow run, from the Prefect API."""
    script = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
with get_client(sync_client=True) as c:
    runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[sys.argv[1]])))
print(json.dumps({t.name: [t.start_time.timestamp(), t.end_time.timestamp()] for t in runs if t.end_time}))
"""
    out = subprocess.run([sys.executable, "-c", script, flow_run_id], env=env, capture_output=True, text=True, check=True)
    return {k: tuple(v) for k, v in json.loads(out.stdout).items()}


def _flow_run_id(output: str) -> str:
    for line in output.splitlines():
        if "UUID:" in line:
            return line.split("UUID:")[1].strip()
    raise AssertionError(f"no flow run id in:\n{output}")


@pytest.fixture(scope="session")
def flow_runs(tmp_path_factory, fmnist_root, xdg_cache):
    """The README's Prefect path on a copy of the repo: the server (detached, its log in .prefect/),
    the deployment served with two Dask workers, and two deployment runs of the smoke profile at one
    operating point per mode: with a junk weights file (fails in the task networks' stages), then as
    is. (A third, unchanged run would show DVC's skipping once more for ~50 s: the second run's
    skipped stages and kfp.local's second run in test_scaling cover it.)

    Session-scoped, not module-scoped: a pytest-xdist worker tears module fixtures down whenever its
    next queued test is from another module, which would start the server and all runs again."""
    tmp_path = tmp_path_factory.mktemp("flow")
    repo = copy_repo(tmp_path / "repo", repo_params({}))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    port = _free_port()
    db = fresh_mlflow(tmp_path / "mlflow.db")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false",  # the API is all these tests read; the UI's assets cost start-up time
           "MLFLOW_TRACKING_URI": db, "PYTHONPATH": str(repo), "TACTIC_DASK_WORKERS": "2", "PYTHONUNBUFFERED": "1",
           "XDG_CACHE_HOME": str(xdg_cache)}  # the suite's first server migrates its database and keeps the template
    logs = tmp_path / "logs"
    logs.mkdir()
    served = None
    try:
        started = subprocess.run([sys.executable, "-m", "pipeline.server", "start"], cwd=repo, env=env, capture_output=True,
                                 text=True, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        served = subprocess.Popen([sys.executable, "-m", "pipeline.serve", "--workers", "2"], cwd=repo, env=env,
                                  stdout=open(logs / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for(lambda: _answers(f"http://127.0.0.1:{port}/api/deployments/name/tactic/full"), 120, "the deployment")

        def run(weights=None):
            return _deployment_run(env, repo, "--params", json.dumps({"profile": "smoke", "betas": [0.004], "params": {
                "jpeg": {"qualities": [5]}, "model": {"task": {"weights": weights}}}}))

        junk = tmp_path / "junk.pt"
        junk.write_bytes(b"\x80" + random.Random(0).randbytes(999))  # 0x80 opens a pickle, not torch's
        runs = {"junk": junk, "env": env, "repo": repo, "db": db, "tmp": tmp_path, "cache": xdg_cache}
        runs["bad"] = run(weights=str(junk))
        runs["good"] = run()
        assert runs["good"].returncode == 0, runs["good"].stdout[-3000:] + (logs / "serve.log").read_text()[-5000:]
        mlflow.set_tracking_uri(db)
        yield runs
    finally:
        if served is not None:
            os.killpg(served.pid, 15)
            served.wait(timeout=30)
        subprocess.run([sys.executable, "-m", "pipeline.server", "stop"], cwd=repo, env=env, timeout=60)


def _parent(flow_run_id: str):
    parents = mlflow.search_runs(experiment_names=["tactic"], filter_string=f"tags.prefect_flow_run_id = '{flow_run_id}'")
    assert len(parents) == 1 and parents.iloc[0]["tags.git_commit"]
    return parents.iloc[0]


PREFECT = pytest.mark.xdist_group("prefect")  # one worker runs them all: the fixture's flow runs are made once


@pytest.mark.slow
@PREFECT
def test_a_failing_stage_fails_the_flow_run_with_its_own_message(flow_runs):
    bad = flow_runs["bad"]
    assert bad.returncode != 0, bad.stdout
    logs = subprocess.run([BIN / "prefect", "flow-run", "logs", _flow_run_id(bad.stdout)], env=flow_runs["env"],
                          capture_output=True, text=True).stdout
    assert f"model.task.weights: {flow_runs['junk']}: not a PyTorch file" in logs, logs[-3000:]


@pytest.mark.slow
@PREFECT
def test_the_next_run_continues_from_what_finished(flow_runs):
    parent = _parent(_flow_run_id(flow_runs["good"].stdout))
    # prepare and pretrain finished in the failed run and are skipped; `weights` re-hashes what params
    # name on every run; the four task networks, evaluate and report run.
    assert (parent["metrics.stages_ran"], parent["metrics.stages_skipped"]) == (7, 2)
    children = mlflow.search_runs(experiment_names=["tactic"], filter_string=f"tags.mlflow.parentRunId = '{parent['run_id']}'")
    stages = set(children["tags.dvc_stage"].dropna())
    assert not any(s.startswith(("pretrain", "prepare")) for s in stages)  # done by the failed run, not redone
    assert {"evaluate", "report", "train_aware@0.004-0", "train_agnostic@0.004-0", "train_jpeg@5-0"} <= stages
    trained = children[children["tags.dvc_stage"].str.startswith("train_")]
    assert trained["metrics.top1"].notna().all() and (trained["metrics.bpp"] > 0).all()


@pytest.mark.slow
@PREFECT
def test_one_prefect_task_per_stage(flow_runs):
    # How many ran at once is measured by benchmarks/orchestration.py, not asserted.
    tasks = _task_runs(flow_runs["env"], _flow_run_id(flow_runs["good"].stdout))
    assert set(tasks) == {"prepare", "weights", "pretrain@0.004-0", "train_uncompressed@0", "train_jpeg@5-0",
                          "train_agnostic@0.004-0", "train_aware@0.004-0", "evaluate", "report"}


@pytest.mark.slow
@PREFECT
def test_the_flow_run_shows_its_results_and_progress_in_prefect(flow_runs):
    script = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
with get_client(sync_client=True) as c:
    arts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[sys.argv[1]])))
print(json.dumps({a.key: [a.type, str(a.data)] for a in arts}))
"""
    out = subprocess.run([sys.executable, "-c", script, _flow_run_id(flow_runs["good"].stdout)], env=flow_runs["env"],
                         capture_output=True, text=True, check=True)
    artifacts = json.loads(out.stdout)
    assert "| aware | beta=0.004 | 1 |" in artifacts["tactic-results"][1] and "BD-accuracy" in artifacts["tactic-results"][1]
    assert "/runs/" in artifacts["tactic-mlflow"][1] and artifacts["tactic-progress"][0] == "progress"
    assert float(artifacts["tactic-progress"][1]) == 100


@pytest.mark.slow
@PREFECT
def test_compare_prints_the_operating_points_of_a_flow_run(flow_runs, monkeypatch, capsys):
    from tactic.cli import main  # `tactic`'s own entry, in this process: the command's 4-5 s of imports are the suite's already

    parent = _parent(_flow_run_id(flow_runs["good"].stdout))
    csv = flow_runs["tmp"] / "c.csv"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", flow_runs["db"])
    status = main(["compare", "--parent", parent["run_id"], "--csv", str(csv)])
    out = capsys.readouterr()
    assert status == 0 and "| aware | beta=0.004 | 1 |" in out.out, out.err
    assert csv.read_text().startswith("mode,beta,quality,bpp")


@pytest.mark.slow
@PREFECT
def test_a_prefect_server_on_a_new_home_starts_from_the_migrated_template(flow_runs, tmp_path):
    """The suite's first Prefect server (the fixture's, which starts first) migrated its new database
    and kept an empty copy; a flow's temporary server on another new home starts from that copy (no
    migrations) and works; what either records never reaches the template."""
    script = """
import sys
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from pipeline.server import Temporary
api = Temporary()
print("migrating" if api.fresh else "seeded", flush=True)
api.ready()
with temporary_settings({PREFECT_API_URL: api.url}), get_client(sync_client=True) as client:
    client.create_flow_from_name("second")
    print(sorted(f.name for f in client.read_flows()))
"""
    env = {k: v for k, v in flow_runs["env"].items() if k != "PREFECT_API_URL"}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**env, "PREFECT_HOME": str(tmp_path / "home")},
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and out.stdout.split() == ["seeded", "['second']"], out.stdout + out.stderr[-3000:]
    [template] = (flow_runs["cache"] / "tactic").glob("prefect-*.db")

    def rows(db, table):
        with contextlib.closing(sqlite3.connect(db)) as con:
            return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    assert rows(template, "alembic_version") == 1 and rows(template, "block_type") > 0
    assert rows(template, "flow") == 0 and rows(flow_runs["tmp"] / "prefect" / "prefect.db", "flow") == 1  # `tactic`


def test_an_unusable_prefect_template_is_dropped_and_the_server_migrates(tmp_path):
    """The template only saves time: a corrupt one is reported, removed (the next migrating server
    keeps a good one) and leaves the new home empty, for the server to migrate as without it."""
    script = """
from pipeline import server
server.template().parent.mkdir(parents=True)
server.template().write_bytes(b"not a database " * 100)
print(server.seed())
print(server.template().exists(), sorted(p.name for p in server._database().parent.iterdir()))
"""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PREFECT_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == [str(tmp_path / "home" / "prefect.db"), "False []"], out.stdout
    assert "not used (file is not a database)" in out.stderr

def _dvc_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "locks"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([BIN / "dvc", "init", "-q"], cwd=repo, check=True)
    (repo / "in.txt").write_text("x")
    (repo / "dvc.yaml").write_text("stages:\n  s:\n    cmd: cp in.txt out.txt\n    deps: [in.txt]\n    outs: [out.txt]\n")
    return repo


def _holder(code: str) -> subprocess.Popen:
    """A process that holds a DVC lock until told to let go; waited on in a thread, so its pid is gone (not a zombie) after."""
    proc = subprocess.Popen([sys.executable, "-c", code])
    threading.Thread(target=proc.wait, daemon=True).start()
    return proc


# `python -m pipeline.repro -s <stage>` (run_dvc_stage's own command), and once an attempt has failed on
# the lock, the flag file that tells the holder to let go: the retry then finds the lock free, at
# once rather than after a fixed hold long enough for a slow machine.
ATTEMPT = """import pathlib, subprocess, sys
out = subprocess.run([sys.executable, "-m", "pipeline.repro", "-s", sys.argv[2]], capture_output=True, text=True)
print(out.stdout + out.stderr)
if out.returncode and any(m in out.stdout + out.stderr for m in sys.argv[3:]):
    pathlib.Path(sys.argv[1]).touch()
sys.exit(out.returncode)
"""
HOLD = "import os, time\nend = time.time() + 60\nwhile not os.path.exists({flag!r}) and time.time() < end: time.sleep(0.05)"


@pytest.mark.parametrize("lock", ["repository", "rwlock"])
def test_real_dvc_lock_errors_are_retried(tmp_path, lock):
    """Real DVC, held off by each of its two locks: `dvc repro -s` fails with that lock's message, and
    run_dvc_stage retries it until the holder lets go."""
    repo = _dvc_repo(tmp_path)
    flag = str(tmp_path / "failed-once")
    if lock == "repository":  # what another `dvc` command holds while it runs
        ready = tmp_path / "ready"
        _holder(f"import zc.lockfile, pathlib; l = zc.lockfile.LockFile({str(repo / '.dvc/tmp/lock')!r}); "
                f"pathlib.Path({str(ready)!r}).touch()\n" + HOLD.format(flag=flag))  # DVC itself waits 3 s first
        _wait_for(ready.exists, 30, "the lock holder")
        message = "Unable to acquire lock"
    else:  # what a running stage holds on its outputs: another stage writing out.txt
        sleeper = _holder(HOLD.format(flag=flag))
        (repo / ".dvc/tmp/rwlock").write_text(json.dumps(
            {"write": {str(repo / "out.txt"): {"pid": sleeper.pid, "cmd": "dvc repro -s other"}}, "read": {}}))
        message = "is busy, it is being blocked by"
    status, output = run_dvc_stage("s", repo, stage_env(), command=[sys.executable, "-c", ATTEMPT, flag, "s", message])
    assert status == "ran" and message in output and (repo / "out.txt").read_text() == "x"


def _dot_graph(text: str) -> tuple[set, set]:
    """The stages of `dvc dag --dot` and its (stage, stage it depends on) pairs."""
    import re

    return set(re.findall(r'^"([^"]+)";$', text, re.M)), {(b, a) for a, b in re.findall(r'"([^"]+)" -> "([^"]+)"', text)}


@pytest.mark.slow
def test_kubeflow_pipeline_of_every_profile_has_dvcs_stages_and_edges(tmp_path):
    """The compiled KFP pipeline against DVC's own view of the same params (`dvc dag`: stages, edges)."""
    from pipeline.kubeflow import compile_pipeline
    from tactic.profiles import PROFILES

    repo = copy_repo(tmp_path / "repo", repo_params({}))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    for profile in sorted(f.stem for f in PROFILES.glob("*.yaml")):
        write_params(repo / "params.yaml", resolve_params(REPO, profile=profile))
        # In a thread of its own: kfp calls inspect.stack() for every env var it sets on a task, which
        # under pytest's deep stack cost up to ~0.3 s each (most of this test's time); a new thread's
        # stack is short.
        with ThreadPoolExecutor(1) as thread:
            thread.submit(compile_pipeline, tmp_path / f"{profile}.yaml", repo).result()
        spec, platform = yaml.safe_load_all((tmp_path / f"{profile}.yaml").read_text())  # kfp-kubernetes: the PVC
        assert "tactic-workspace" in json.dumps(platform), profile
        tasks = spec["root"]["dag"]["tasks"]
        names = {key: t["taskInfo"]["name"] for key, t in tasks.items()}
        edges = {(names[key], names[dep]) for key, t in tasks.items() for dep in t.get("dependentTasks", [])}
        assert (set(names.values()), edges) == _dot_graph(dvc(repo, "dag", "--dot")), profile
        task = next(iter(tasks.values()))
        executor = spec["deploymentSpec"]["executors"][task["componentRef"]["name"].replace("comp-", "exec-")]
        assert "python -m pipeline.repro --single-item" in " ".join(executor["container"]["args"]), profile
        assert task["cachingOptions"] == {} or not task["cachingOptions"].get("enableCache"), profile
