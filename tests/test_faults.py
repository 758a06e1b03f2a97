"""Real faults, in real stage processes: SIGKILL mid-training and mid-prepare, a diverging learning
rate, weights files that are not what params say. What each leaves behind is what the README's
"Failures" table states."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from tactic.config import merged
from tactic.experiment.run import train_task
from tactic.experiment.grid import Run
from tactic.io import BadFileError, load_torch, process_start
from tests.helpers import BIN, REPO, TINY, fresh_mlflow

# Enough steps per epoch (one thread) that a kill lands inside the first epoch or between checkpoints.
SLOW = merged(TINY, {"prepare": {"train_size": 3000}, "train": {"epochs": 4, "batch_size": 8}})


@pytest.fixture(autouse=True)
def _own_db(tmp_path, monkeypatch):
    """A tracking database per test: each asserts on every run of its stage."""
    # Created here: two processes creating one SQLite store's tables at once collide.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh_mlflow(tmp_path / "mlflow.db"))
    yield
    monkeypatch.undo()
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])


def _workdir(tmp_path: Path, params: dict, prepared: Path | None = None) -> Path:
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if prepared is not None:
        os.symlink(prepared, work / "data" / "prepared")
    return work


def _env():
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def _start(work: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args, "--params", str(work / "params.yaml")], cwd=work, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(work: Path, *args, params: str = "params.yaml") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args, "--params", str(work / params)], cwd=work, env=_env(),
                          capture_output=True, text=True, timeout=300)


def _runs(stage: str) -> list:
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("tactic")
    return client.search_runs([exp.experiment_id], f"tags.dvc_stage = '{stage}'") if exp else []


def _wait(check, what: str, proc: subprocess.Popen | None = None, timeout: float = 120):
    end = time.time() + timeout
    while time.time() < end:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the stage ended (exit {proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _kill(proc: subprocess.Popen, stage: str) -> None:
    """SIGKILL the stage and wait until the process that owns its MLflow run is gone (a served stage
    runs in a child of the stage server, which the server kills when its client dies)."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for r in _runs(stage):
        token = r.data.tags.get("tactic.process", "")
        if token:
            _wait(lambda: process_start(int(token.split("-")[0])) is None, "the served stage to die")


@pytest.fixture(scope="module")
def slow_prepared(tmp_path_factory, fmnist_root):
    from tactic.config import parse_params
    from tactic.data.prepare import prepare

    out = tmp_path_factory.mktemp("slow") / "prepared"
    prepare(parse_params(SLOW).prepare, out)
    return out


@pytest.mark.slow
def test_sigkill_before_and_after_the_first_checkpoint(tmp_path, slow_prepared):
    stage, run = "train_uncompressed@0", Run("uncompressed", 0)
    work = _workdir(tmp_path, SLOW, slow_prepared)
    ckpt = work / ".checkpoints" / run.key / "last.pt"

    # Killed inside its first epoch: no checkpoint, no model; its MLflow run can only stay RUNNING...
    first = _start(work, "stages.train", "uncompressed", "--seed", "0")
    _wait(lambda: any(r.info.status == "RUNNING" for r in _runs(stage)), "the MLflow run", first)
    _kill(first, stage)
    assert not ckpt.exists() and not (work / "models" / run.key / "model.pt").exists()
    (killed,) = _runs(stage)
    assert killed.info.status == "RUNNING"

    # ...until the next stage closes it (KILLED, the reason tagged); that one is killed after a checkpoint.
    second = _start(work, "stages.train", "uncompressed", "--seed", "0")
    _wait(ckpt.exists, "the first checkpoint", second)
    _kill(second, stage)
    assert not (work / "models" / run.key / "model.pt").exists()
    closed = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(killed.info.run_id)
    assert closed.info.status == "KILLED" and "ended without closing its run" in closed.data.tags["failure_reason"]

    # The third run resumes the second's checkpoint and MLflow run, to the weights of an uncut run.
    third = _run(work, "stages.train", "uncompressed", "--seed", "0")
    assert third.returncode == 0, third.stdout + third.stderr
    assert "resuming from" in third.stderr and not ckpt.exists()
    resumed = torch.load(work / "models" / run.key / "model.pt", weights_only=False)
    statuses = {r.info.run_id: r.info.status for r in _runs(stage)}
    assert statuses == {killed.info.run_id: "KILLED", resumed["mlflow_run_id"]: "FINISHED"}  # nothing RUNNING
    finished = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(resumed["mlflow_run_id"])
    assert "failure_reason" not in finished.data.tags and "killed" in finished.data.tags["tactic.resumed_after"]
    ref_models = tmp_path / "ref" / "models"
    from tactic.config import parse_params
    train_task(parse_params(SLOW), run, slow_prepared, ref_models)
    reference = torch.load(ref_models / run.key / "model.pt", weights_only=False)
    assert all(torch.equal(v, resumed["task"][k]) for k, v in reference["task"].items())


@pytest.mark.slow
def test_sigkill_of_prepare_leaves_no_temporary_after_the_next_run(tmp_path, fmnist_root):
    work = _workdir(tmp_path, merged(TINY, {"prepare": {"train_size": 20000, "test_size": 5000}}))
    proc = _start(work, "stages.prepare")
    temp = _wait(lambda: [p for p in (work / "data").glob(".prepared.*") if p.is_dir()], "prepare's temporary folder", proc)
    _wait(lambda: any(temp[0].rglob("*.npy")), "its first array", proc)
    _kill(proc, "prepare")
    assert not (work / "data" / "prepared").exists() and temp[0].exists()  # what a kill leaves...

    done = _run(work, "stages.prepare")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "left by an interrupted run" in done.stderr  # ...is removed by the next prepare
    assert [p.name for p in (work / "data").iterdir()] == ["prepared"]
    assert sorted(r.info.status for r in _runs("prepare")) == ["FINISHED", "KILLED"]  # nothing RUNNING


def test_divergence_in_a_stage_process_is_a_clear_error_and_a_failed_run(tmp_path, prepared):
    work = _workdir(tmp_path, merged(TINY, {"train": {"lr": 1e12}}), prepared)
    done = _run(work, "stages.train", "uncompressed", "--seed", "0")
    assert done.returncode == 3, done.stdout + done.stderr
    assert "train_uncompressed@0: training diverged at epoch 1" in done.stderr and "Traceback" not in done.stderr
    assert not (work / "models").exists() and not list(work.rglob("last.pt"))
    (failed,) = _runs("train_uncompressed@0")
    assert failed.info.status == "FAILED" and "training diverged" in failed.data.tags["failure_reason"]


def _bad_files(tmp_path: Path) -> dict:
    from tactic.tasks.classifiers import SmallCNN

    good = tmp_path / "good.pth"
    torch.save(SmallCNN(1, 10, 8).state_dict(), good)
    blob = good.read_bytes()
    junk = random.Random(0).randbytes(4096)  # seeded: neither torch's zip nor its pickle magic at the start
    files = {"random bytes": (junk, "not a PyTorch file"),
             "a pickle opcode, then junk": (b"\x80" + junk, "not a PyTorch file"),
             "truncated": (blob[: len(blob) // 2], "truncated or damaged PyTorch file"),
             "another architecture": (None, "wrong architecture")}
    out = {}
    for name, (data, says) in files.items():
        path = tmp_path / f"{name.replace(' ', '_')}.pth"
        if data is None:
            torch.save(SmallCNN(1, 10, 16).state_dict(), path)  # width 16, params say 8
        else:
            path.write_bytes(data)
        out[name] = (path, says)
    return out


def test_bad_weights_files_name_the_param_the_path_and_the_fault(tmp_path, prepared):
    work = _workdir(tmp_path, TINY, prepared)
    for name, (path, says) in _bad_files(tmp_path).items():
        (work / "bad.yaml").write_text(yaml.safe_dump(merged(TINY, {"model": {"task": {"weights": str(path)}}})))
        done = _run(work, "stages.train", "uncompressed", "--seed", "0", params="bad.yaml")
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, (name, done.stderr)
        assert lines[0].startswith(f"error: model.task.weights: {path}") and says in lines[0], (name, lines[0])


def test_every_file_a_stage_reads_is_named_when_it_is_bad(tmp_path, tiny_params, prepared):
    from tactic.data.prepared import read_meta
    from tactic.codecs.hyperprior import load_hyperprior
    from tactic.experiment.system import build_task, load_system

    junk, half = tmp_path / "junk.pt", tmp_path / "half.pt"
    junk.write_bytes(b"\x00" * 100)
    train_task(tiny_params, Run("uncompressed", 0), prepared, tmp_path / "models")
    model = tmp_path / "models" / "uncompressed" / "s0" / "model.pt"
    half.write_bytes(model.read_bytes()[:-2000])
    with pytest.raises(BadFileError, match=f"latent.checkpoint: {junk}: not a PyTorch file"):
        load_hyperprior(junk, 1)
    with pytest.raises(BadFileError, match=f"the model of stage x: {half}: truncated"):
        load_system(half, lambda codec: build_task(tiny_params, read_meta(prepared)), what="the model of stage x")
    wide = merged(TINY, {"model": {"task": {"width": 16}}})
    from tactic.config import parse_params
    with pytest.raises(BadFileError, match=f"{model} does not fit SmallCNN \\(wrong architecture"):
        load_system(model, lambda codec: build_task(parse_params(wide), read_meta(prepared)))
    with pytest.raises(FileNotFoundError, match="latent.weights: no such file"):
        load_torch(tmp_path / "nothing.pth", "latent.weights")


def test_weights_stage_hashes_what_params_name(tmp_path):
    from stages import weights

    f = tmp_path / "w.pth"
    f.write_bytes(b"one")
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump(merged(TINY, {"model": {"task": {"weights": str(f)}}})))
    out = tmp_path / "weights"
    weights.main(["--params", str(params), "--out", str(out)])
    first = (out / "model.task.weights.json").read_text()
    f.write_bytes(b"two")  # same path, new contents: the stages that read it must see a new dependency
    weights.main(["--params", str(params), "--out", str(out)])
    assert (out / "model.task.weights.json").read_text() != first
    assert (out / "latent.weights.json").read_text().strip() == "{}"
    # dvc.yaml: every stage that reads a weights file depends on that param's hash file.
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, param in [("train_uncompressed", "model.task.weights"), ("train_aware", "model.task.weights"),
                        ("pretrain_hyperprior", "latent.checkpoint"), ("train_latent_joint", "latent.weights")]:
        assert f"data/weights/{param}.json" in stages[name]["deps"], name


def test_runs_clean_ends_runs_whose_process_is_gone(capsys):
    import socket

    from tactic import runs, tracking

    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid now names no process
    client = tracking.setup().MlflowClient()
    exp = client.get_experiment_by_name("tactic").experiment_id
    host = socket.gethostname()
    orphan = client.create_run(exp, tags={"tactic.host": host, "tactic.process": f"{gone.pid}-1", "dvc_stage": "x@1"})
    alive = client.create_run(exp, tags={"tactic.host": host, "tactic.process": tracking.process_token(), "dvc_stage": "y@1"})
    foreign = client.create_run(exp, tags={"tactic.host": "elsewhere", "tactic.process": f"{gone.pid}-1"})
    assert runs.main(["clean"]) == 0
    assert "1 orphaned run(s) ended" in capsys.readouterr().out
    status = {r: client.get_run(r.info.run_id).info.status for r in (orphan, alive, foreign)}
    assert list(status.values()) == ["KILLED", "RUNNING", "RUNNING"]
    assert f"process {gone.pid} on {host} ended" in client.get_run(orphan.info.run_id).data.tags["failure_reason"]
    runs.main([])
    listed = capsys.readouterr().out
    assert "y@1: process alive" in listed and "owner unknown (host elsewhere)" in listed


def test_expected_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    from stages import cli
    from tactic.errors import TacticError

    def expected():
        raise TacticError("prepare.root: /nowhere: no such folder")

    def bug():
        raise ValueError("operands could not be broadcast together")

    old = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.run(expected)
        assert exit_.value.code == 2 and capsys.readouterr().err == "error: prepare.root: /nowhere: no such folder\n"
        with pytest.raises(ValueError, match="broadcast"):  # not swallowed into one line: the traceback shows
            cli.run(bug)
    finally:
        signal.signal(signal.SIGTERM, old)


@pytest.mark.slow
def test_sigterm_of_prepare_unwinds_removes_its_temporary_and_ends_the_run_killed(tmp_path, fmnist_root):
    work = _workdir(tmp_path, merged(TINY, {"prepare": {"train_size": 20000, "test_size": 5000, "workers": 2}}))
    proc = _start(work, "stages.prepare")
    temp = _wait(lambda: [p for p in (work / "data").glob(".prepared.*") if p.is_dir()], "prepare's temporary folder", proc)
    _wait(lambda: any(temp[0].rglob("*.npy")), "its first array", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM, proc.stdout.read()  # its decoding workers die with it
    assert "terminated (SIGTERM)" in proc.stdout.read()
    assert not list((work / "data").iterdir())  # no temporary, no prepared data
    assert [r.info.status for r in _runs("prepare")] == ["KILLED"]


# A process whose threads keep writing after its reader has gone, as the flow's (Dask, Prefect) do.
TALKER = """import pathlib, sys, threading, time
if sys.argv[2] == "copy":
    from pipeline.stages import outlive_the_reader
    outlive_the_reader()
def talk():
    for i in range(300):
        print(f"out {i}", flush=True)
        print(f"err {i}", file=sys.stderr, flush=True)
        time.sleep(0.002)
    pathlib.Path(sys.argv[1]).write_text("done")
thread = threading.Thread(target=talk)
thread.start()
thread.join()
print("end", flush=True)
"""


def test_the_flow_outlives_the_reader_of_its_output(tmp_path):
    """`python -m pipeline.flow 2>&1 | head` hung for good: a thread writing to the pipe after `head`
    left died of BrokenPipeError (Dask's event loop's, there). Through `outlive_the_reader` the
    threads go on and the process ends 0; while the reader stays, every line reaches it."""
    (tmp_path / "talker.py").write_text(TALKER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(how, pipe):
        marker = tmp_path / f"{how}.done"
        out = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} talker.py {marker} {how} {pipe}"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        return out, marker.exists()

    out, finished = run("plain", "2>&1 | head -1")
    assert not finished  # the writing thread died: what the flow's threads did
    out, finished = run("copy", "2>&1 | head -1")
    assert finished and out.returncode == 0 and out.stdout == "out 0\n", out.stderr
    out, finished = run("copy", "| cat")
    assert finished and out.returncode == 0 and out.stdout.splitlines() == [f"out {i}" for i in range(300)] + ["end"]
    assert out.stderr.splitlines() == [f"err {i}" for i in range(300)]
