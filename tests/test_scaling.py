"""Scaling out, for real (slow): the DVC graph through kfp.local, and the Prefect flow on a Dask
cluster of separate scheduler and worker processes on loopback, one worker SIGKILLed in the middle of
a training stage; each against the plain run of the same params in another copy (conftest.py's
`reference`)."""
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.stages import GUARD_GRACE_S, stop_groups
from tactic.config import parse_params
from tests.helpers import BIN, ONE_POINT as RUN, copy_repo, fresh_mlflow, grid_graph, results_of

# The smoke profile at one operating point per mode, as the Prefect deployment tests run it: 9 stages.
STAGES = {"prepare", "weights", "pretrain@0.004-0", "train_uncompressed@0", "train_jpeg@5-0", "train_agnostic@0.004-0",
          "train_aware@0.004-0", "evaluate", "report"}
# One pytest worker runs them all (`--dist loadgroup`) with the other end-to-end tests: the reference is made once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("e2e")]


def _checkout(tmp: Path, xdg_cache: Path) -> tuple[Path, dict]:
    """A copy of the repo with RUN's params, and the environment its commands run in (a private
    MLflow database and Prefect home; no Prefect server: the flow starts a temporary one, from the
    suite's template of a migrated database where one has been kept)."""
    repo = copy_repo(tmp / "repo", RUN)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": fresh_mlflow(tmp / "mlflow.db"),
           "PYTHONPATH": str(repo), "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false", "PYTHONUNBUFFERED": "1", "XDG_CACHE_HOME": str(xdg_cache)}
    env.pop("PREFECT_API_URL", None)
    # One torch thread per stage everywhere, so that every way of running gives the same sums: the
    # flow sets TACTIC_THREADS to cores // TACTIC_DASK_WORKERS, one per core when that is unset.
    env.pop("TACTIC_DASK_WORKERS", None)
    env["TACTIC_THREADS"] = "1"
    return repo, env


def _stage_runs(db: Path) -> list[tuple[str, str, dict]]:
    """(stage, status, tags) of every MLflow stage run in the database, oldest first; the tags hold
    the start and end times (ms) too, as `start` and `end`."""
    if not db.is_file():
        return []
    with sqlite3.connect(db) as con:
        runs = con.execute("SELECT run_uuid, status, start_time, end_time FROM runs ORDER BY start_time").fetchall()
        tags = {}
        for run, key, value in con.execute("SELECT run_uuid, key, value FROM tags"):
            tags.setdefault(run, {})[key] = value
    return [(tags[run]["dvc_stage"], status, {**tags[run], "start": start, "end": end}) for run, status, start, end in runs
            if "dvc_stage" in tags.get(run, {})]


def _temporaries(repo: Path) -> list[Path]:
    """What an interrupted writer leaves: tactic.io's `.<name>.<pid>-<start>.*` temporaries, `*.tmp`."""
    return [p for p in repo.rglob("*") if not p.relative_to(repo).parts[0] in (".dvc", ".git")
            and (re.fullmatch(r"\..+\.\d+-\d+\..*", p.name) or p.name.endswith(".tmp"))]


# -- kfp.local -------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def kfp_runs(tmp_path_factory, fmnist_root, xdg_cache):
    """`tactic kubeflow run-local` twice in one copy; after each, dvc.lock and the MLflow stage runs."""
    tmp = tmp_path_factory.mktemp("kfp")
    repo, env = _checkout(tmp, xdg_cache)
    runs = []
    for _ in range(2):
        out = subprocess.run([BIN / "tactic", "kubeflow", "run-local"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
        statuses = dict(line.split(": ") for line in out.stdout.splitlines() if re.fullmatch(r"\S+: (ran|skipped)", line))
        runs.append({"statuses": statuses, "stdout": out.stdout, "lock": (repo / "dvc.lock").read_text(),
                     "mlflow": _stage_runs(tmp / "mlflow.db")})
    return {"repo": repo, "runs": runs}


def test_kfp_local_runs_every_stage_after_its_needs_and_gives_the_plain_runs_results(kfp_runs, reference):
    first = kfp_runs["runs"][0]
    assert first["statuses"] == {stage: "ran" for stage in STAGES}, first["stdout"][-3000:]
    assert "9 stages ran, 0 up to date (kfp.local)" in first["stdout"]
    assert results_of(kfp_runs["repo"]) == reference
    runs = first["mlflow"]
    assert sorted(stage for stage, _, _ in runs) == sorted(STAGES - {"weights"})  # `weights` logs no MLflow run
    assert all(status == "FINISHED" for _, status, _ in runs)
    # kfp.local ran the tasks one at a time, each after those of the stages it needs (.after()): by their MLflow runs
    assert all(a["end"] <= b["start"] for (_, _, a), (_, _, b) in zip(runs, runs[1:]))
    times = {stage: t for stage, _, t in runs}
    needs = grid_graph(parse_params(RUN))
    assert all(times[need]["end"] <= times[stage]["start"] for stage in times for need in needs[stage] if need in times)
    assert not _temporaries(kfp_runs["repo"])


def test_a_second_kfp_local_run_trains_nothing(kfp_runs):
    first, second = kfp_runs["runs"]
    # DVC skips every stage; `weights` always runs (it re-hashes the files params name, none here)
    assert second["statuses"] == {stage: "ran" if stage == "weights" else "skipped" for stage in STAGES}, second["stdout"][-3000:]
    assert second["mlflow"] == first["mlflow"]  # no new MLflow run: nothing trained, evaluated or reported
    assert second["lock"] == first["lock"]


# -- a Dask cluster of separate processes ----------------------------------------------------------

def _processes() -> dict[int, tuple[int, list[str]]]:
    """{pid: (parent pid, argv)} of every process now."""
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            except (OSError, IndexError, ValueError):
                continue
            found[int(entry.name)] = (ppid, argv)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _stage_of(argv: list[str]):
    """The stage a `python -m pipeline.repro -s <stage>` (or `.../dvc repro -s <stage>`) process runs."""
    for i, arg in enumerate(argv[:3]):
        if (arg == "pipeline.repro" or arg.endswith("/dvc") and argv[i + 1:i + 2] == ["repro"]) and "-s" in argv[i + 1:-1]:
            return argv[argv.index("-s", i) + 1]
    return None


class Watcher(threading.Thread):
    """Every 0.1 s: which Dask worker runs which `dvc repro -s <stage>` (the worker is the process's
    ancestor). Once each worker has finished a stage, it SIGKILLs the worker of the first training
    stage caught between its first epoch and its last (its MLflow run logs val_loss each epoch), then
    times how long that stage's processes outlive their worker and reads the run's status then."""

    def __init__(self, workers: dict[int, str], db: Path):
        super().__init__(daemon=True)
        self.workers, self.db = workers, db
        self.started = {pid: set() for pid in workers}  # worker pid -> the stages it started
        self.finished = {pid: set() for pid in workers}  # ... and those whose `dvc repro` ended there
        self.before_kill: dict = {}
        self.killed: dict = {}
        self.done = threading.Event()

    def run(self):
        running = {}
        while not self.done.is_set():
            now = self._running()
            for stage, (_, worker) in running.items():
                if stage not in now and worker != self.killed.get("worker"):
                    self.finished[worker].add(stage)
            running = now
            try:
                if not self.killed and all(self.finished.values()):
                    self._maybe_kill(running)
                elif self.killed and "gone_after_s" not in self.killed:
                    if not any(_alive(self.killed[k]) for k in ("stage_pid", "dvc_pid")):
                        (status,), = self._query("SELECT status FROM runs WHERE run_uuid = ?", (self.killed["run_id"],))
                        self.killed.update(gone_after_s=time.monotonic() - self.killed["at"], status_then=status)
            except sqlite3.Error:  # no database or no tables yet, or busy: next time
                pass
            time.sleep(0.1)

    def _running(self) -> dict[str, tuple[int, int]]:
        """{stage: (its dvc pid, its worker's pid)} of the stages running now."""
        procs, running = _processes(), {}
        for pid, (_, argv) in procs.items():
            stage = _stage_of(argv)
            if stage:
                worker = pid
                while worker in procs and worker > 1 and worker not in self.workers:
                    worker = procs[worker][0]
                if worker in self.workers:
                    self.started[worker].add(stage)
                    running[stage] = (pid, worker)
        return running

    def _query(self, sql, args=()):
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute(sql, args).fetchall()

    def _maybe_kill(self, running):
        rows = self._query(
            "SELECT s.value, p.value, r.run_uuid FROM runs r"
            " JOIN tags s ON s.run_uuid = r.run_uuid AND s.key = 'dvc_stage'"
            " JOIN tags p ON p.run_uuid = r.run_uuid AND p.key = 'tactic.process'"
            " WHERE r.status = 'RUNNING' AND (SELECT max(step) FROM metrics m WHERE m.run_uuid = r.run_uuid"
            "  AND m.key = 'val_loss') < (CASE WHEN s.value LIKE 'pretrain@%' THEN ? ELSE ? END)",
            (RUN["pretrain"]["epochs"] - 1, RUN["train"]["epochs"] - 1))
        for stage, token, run_id in rows:
            if stage in running:
                dvc_pid, worker = running[stage]
                self.before_kill = {pid: set(stages) for pid, stages in self.finished.items()}
                os.kill(worker, signal.SIGKILL)
                self.killed = {"stage": stage, "run_id": run_id, "worker": worker, "stage_pid": int(token.split("-")[0]),
                               "dvc_pid": dvc_pid, "at": time.monotonic()}
                return


@pytest.fixture(scope="session")
def dask_run(tmp_path_factory, fmnist_root, xdg_cache) -> dict:
    """`python -m pipeline.flow --dask-address` on a scheduler and two single-threaded workers started
    as processes of their own on loopback (`dask scheduler`, `dask worker --no-nanny`: a SIGKILLed
    worker is gone, not restarted by a nanny), one of them SIGKILLed in the middle of a training stage
    once both have finished stages. One flow run for both tests: a run each costs ~50 s on 2 cores."""
    from distributed import Client

    tmp = tmp_path_factory.mktemp("dask")
    repo, env = _checkout(tmp, xdg_cache)
    logs = tmp / "logs"
    logs.mkdir()
    procs = []

    def start(name, *args):
        procs.append(subprocess.Popen([BIN / "dask", *args], cwd=repo, env=env, stdout=open(logs / f"{name}.log", "w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))

    scheduler_file = tmp / "scheduler.json"
    try:
        # Port 0: the scheduler takes a free port and writes its address to the scheduler file.
        start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file", str(scheduler_file))
        for i in range(2):
            start(f"w{i}", "worker", "--scheduler-file", str(scheduler_file), "--host", "127.0.0.1", "--nthreads", "1",
                  "--no-nanny", "--no-dashboard", "--name", f"w{i}")
        deadline = time.time() + 60
        while not scheduler_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        with Client(scheduler_file=str(scheduler_file), timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
            workers = {pid: address for address, pid in client.run(os.getpid).items()}
        assert set(workers) == {p.pid for p in procs[1:]}
        watcher = Watcher(workers, tmp / "mlflow.db")
        watcher.start()
        # The copy's params.yaml is RUN already (`--profile smoke` would bring back its two operating points per mode)
        flow = subprocess.run([sys.executable, "-m", "pipeline.flow", "--dask-address", json.loads(scheduler_file.read_text())["address"]],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        deadline = time.monotonic() + GUARD_GRACE_S + 5
        while watcher.killed and "gone_after_s" not in watcher.killed and time.monotonic() < deadline:
            time.sleep(0.2)
        watcher.done.set()
        watcher.join()
    finally:
        # Workers before the scheduler, each SIGKILLed only after 15 s: a worker used to spend more
        # than a minute exiting, its Prefect services draining into the flow's temporary API server,
        # gone by then (pipeline/flow.py `_drain_workers`); or hung for good, stopped together with
        # its scheduler (pipeline/stages.py `stop_groups`).
        stop_groups(procs, timeout=15)
    return {"repo": repo, "flow": flow, "workers": workers, "watcher": watcher, "mlflow": _stage_runs(tmp / "mlflow.db"),
            "logs": {p.pid: (logs / f"w{i}.log").read_text() for i, p in enumerate(procs[1:])},
            "exits": {p.pid: p.returncode for p in procs[1:]}}


def _flow_ok(run):
    out = run["flow"]
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:] + "".join(log[-3000:] for log in run["logs"].values())


def test_the_flow_fans_out_over_the_workers_of_a_dask_cluster_and_gives_the_plain_runs_results(dask_run, reference):
    _flow_ok(dask_run)
    watcher = dask_run["watcher"]
    assert results_of(dask_run["repo"]) == reference
    assert watcher.before_kill and all(watcher.before_kill.values()), watcher.started  # each worker finished stages
    assert set().union(*watcher.started.values()) == STAGES
    for pid, address in dask_run["workers"].items():
        log = dask_run["logs"][pid]
        for stage in watcher.before_kill[pid]:  # what each task says of where it ran
            assert f"{stage} ran on Dask worker {address} (pid {pid})" in log, log[-3000:]
        # One Prefect API for the flow and its tasks (the flow's temporary server), not a server per worker
        assert "Starting temporary server" not in log


def test_a_worker_killed_mid_stage_takes_its_stage_along_and_the_flow_finishes_on_the_other(dask_run, reference):
    killed = dask_run["watcher"].killed
    assert killed, f"no training stage was caught between its first and last epoch: {dask_run['watcher'].started}"
    _flow_ok(dask_run)
    stage, (alive,) = killed["stage"], set(dask_run["workers"]) - {killed["worker"]}
    # Its `dvc repro` and the stage process (a fork of the stage server, or a process of its own) do
    # not outlive the worker: the guard between them (pipeline.stages.run_guarded) stops them, so
    # nothing writes on beside the copy that Dask reschedules. The stage ends its MLflow run KILLED;
    # by the time the watcher sees its processes gone, the rerun on the other worker may already have
    # resumed that run (RUNNING again), which then says how it ended: `tactic.resumed_after`, from the
    # reason the killed stage tagged while it unwound (a stage dead without unwinding leaves none).
    runs = dask_run["mlflow"]
    mine = [(status, t) for s, status, t in runs if s == stage]
    resumed = len(mine) == 1 and mine[0][1].get("tactic.resumed_after") == "Terminated: SIGTERM"
    assert killed.get("gone_after_s", 1e9) < GUARD_GRACE_S + 1 and (killed["status_then"] == "KILLED" or resumed), (killed, mine)
    # Dask rescheduled the lost task on the other worker, which ran it to the end.
    log = dask_run["logs"][alive]
    assert f"{stage} ran on Dask worker {dask_run['workers'][alive]}" in log, log[-3000:]
    assert results_of(dask_run["repo"]) == reference  # so resuming changed nothing
    assert "RUNNING" not in {status for _, status, _ in runs}, runs
    # The other worker, stopped (SIGTERM) after the flow, exited by itself rather than being SIGKILLed.
    assert dask_run["exits"][alive] != -signal.SIGKILL, dask_run["logs"][alive][-3000:]
    # The rerun resumed the killed run from its last checkpoint (the same MLflow run, now FINISHED), or,
    # killed before its first checkpoint was written, started a new one beside the KILLED run.
    assert [status for status, _ in mine] in (["FINISHED"], ["KILLED", "FINISHED"]), mine
    if len(mine) == 1:
        assert mine[0][1].get("tactic.resumed_after") == "Terminated: SIGTERM", mine
    # Nothing else ran twice (DVC skipped what had finished), nothing is left RUNNING or half-written.
    assert sorted(s for s, status, _ in runs if status == "FINISHED") == sorted(STAGES - {"weights"})
    assert not _temporaries(dask_run["repo"])  # in models/, results/, data/, .checkpoints/
