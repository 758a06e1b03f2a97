"""Running one DVC stage from a flow: DVC's stage graph, and `dvc repro -s` with lock retries.

DVC stays the single source of truth for what is up to date: every task runs one stage (one matrix
entry) with `dvc repro -s`, which skips it when its deps and params are unchanged, but for the stages
that one `dvc status` at the start, and dvc.lock since, show DVC would skip (`fresh_at_start`). The stage process
never outlives the process that runs it (`run_guarded`): when a Dask worker dies mid-stage, its
stage stops too, instead of writing on beside the copy that Dask reschedules on another worker.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

# DVC's two lock errors: the repository lock (one `dvc` command at a time changes .dvc/), and the
# rwlock of a stage's paths (another stage is writing what this one reads, or the reverse).
LOCK_MESSAGES = ("Unable to acquire lock", "is busy, it is being blocked by")
RETRIED = "\n(retried: another DVC process held the lock)\n"  # between the outputs of a stage's attempts


class StageFailed(RuntimeError):
    def __init__(self, message: str, output: str = ""):
        super().__init__(message)
        self.output = output  # everything the stage printed, for who shows it whole


def dvc_graph(root: str | Path) -> dict[str, list[str]]:
    """{stage entry: the entries it depends on}, from DVC itself, in a runnable order (each stage
    after the stages it needs; otherwise by name)."""
    import warnings

    from dvc.repo import Repo

    with Repo(str(root)) as repo, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # DVC's own internals (pygtrie), hundreds per graph
        graph = repo.index.graph  # edges go from a stage to the stages whose outputs it reads
        needs = {stage.name: sorted(dep.name for dep in graph.successors(stage)) for stage in graph.nodes}
    order: dict[str, list[str]] = {}

    def visit(name):
        if name not in order:
            for need in needs[name]:
                visit(need)
            order[name] = needs[name]

    for name in sorted(needs):
        visit(name)
    return order


def fresh_at_start(root: str | Path, graph: dict[str, list[str]]) -> dict[str, Optional[dict]]:
    """For each stage, None where `dvc status` finds it changed now, else {each stage it needs: its
    outputs as dvc.lock records them now}: with `still_fresh`, which stages `dvc repro -s` would skip,
    told without starting DVC for each (on the slow machine kind a stage's DVC process costs ~1.8 s:
    a no-op run of the default's 70 stages took 64 s). A stage is skipped if it was up to date at
    the start and every stage it needs still has those outputs: one that ran since may have written
    the same bytes (`weights` runs every time), and then what needs it stays up to date, as DVC would
    find. Anything else goes to DVC, which stays the judge."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        changed = {name.rsplit(":", 1)[-1] for name in repo.status()}  # "dvc.yaml:name" outside the root
    outs = lock_outs(root)
    return {name: None if name in changed else {n: outs.get(n) for n in needs} for name, needs in graph.items()}


def still_fresh(fresh: Optional[dict], now: dict[str, list]) -> bool:
    """A stage up to date at the start whose needs have the outputs they had (`fresh`, from
    `fresh_at_start`), by `now` (`lock_outs`: {} while another stage is writing the lock, so it goes to DVC)."""
    return fresh is not None and all(n in now and now[n] == outs for n, outs in fresh.items())


def lock_outs(root: str | Path) -> dict[str, list]:
    """{stage: its outputs (paths and hashes) in dvc.lock}; {} while the lock cannot be read."""
    import yaml

    try:
        with open(Path(root) / "dvc.lock") as f:
            lock = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
        return {name: entry.get("outs") for name, entry in lock.get("stages", {}).items()}
    except (OSError, yaml.YAMLError, AttributeError):
        return {}


def _reach(graph: dict[str, list[str]]) -> tuple[dict[str, set], dict[str, set]]:
    """For each stage, every stage it needs and every stage that needs it, directly or not (`graph`
    in a runnable order: a stage after those it needs)."""
    users = {name: [] for name in graph}
    for name, needs in graph.items():
        for need in needs:
            users[need].append(name)

    def reach(edges: dict, order) -> dict[str, set]:  # `order` visits every edge's far end first
        seen = {}
        for name in order:
            seen[name] = set().union(*({other} | seen[other] for other in edges[name]))
        return seen

    return reach(graph, list(graph)), reach(users, reversed(list(graph)))


def alone(graph: dict[str, list[str]]) -> set[str]:
    """The stages nothing can run beside: every other stage is one they need or one that needs them
    (evaluate and report; not prepare, which `weights` runs beside)."""
    needed, needing = _reach(graph)
    return {name for name in graph if len(needed[name]) + len(needing[name]) == len(graph) - 1}


def stage_priority(graph: dict[str, list[str]]) -> dict[str, int]:
    """Which of the ready stages start first when there are more than lanes (higher first): those
    that more stages wait on, then those deeper in the graph, so that the short leaves (JPEG,
    uncompressed) fill the end. `graph` in a runnable order (a stage after those it needs), which
    breaks ties. One rule for `pipeline.repro --jobs` and the Prefect flow (as Dask priorities)."""
    users = _reach(graph)[1]
    depth: dict[str, int] = {}
    for name, needs in graph.items():
        depth[name] = 1 + max((depth[n] for n in needs), default=0)
    order = sorted(graph, key=lambda n: (-len(users[n]), -depth[n]))
    return {name: len(order) - i for i, name in enumerate(order)}


def stage_threads(graph: dict[str, list[str]], lanes: int) -> dict[str, str]:
    """`TACTIC_THREADS` of each stage when `lanes` stages run at once: cores // lanes (or the
    TACTIC_THREADS this process was given), except for a stage nothing can run beside (evaluate,
    report), which gets every core. One rule for `pipeline.repro --jobs` and the Prefect flow."""
    cores = os.cpu_count() or 1
    shared = os.environ.get("TACTIC_THREADS") or str(max(1, cores // max(1, lanes)))
    lone = alone(graph)
    return {name: str(cores) if name in lone else shared for name in graph}


def stage_env(extra: dict | None = None) -> dict:
    """The environment of a stage process: this interpreter's bin first, since DVC commands call `python`."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def outlive_the_reader() -> None:
    """Stdout and stderr, where they are pipes, through a pipe of our own that a thread copies on:
    when whoever reads them goes away (`... 2>&1 | head`), the copy stops and this process runs on,
    its output discarded. Written to directly, a pipe without a reader raises BrokenPipeError in
    whichever thread writes next (Python ignores SIGPIPE): Dask's event-loop thread died of it and
    the flow hung for good, its MLflow run RUNNING. What is still in the pipe is copied at exit."""
    import atexit
    import stat

    pipes = {}  # (device, inode) of a real pipe -> the fds (1, 2) that write to it
    for fd in (1, 2):
        st = os.fstat(fd)
        if stat.S_ISFIFO(st.st_mode):
            pipes.setdefault((st.st_dev, st.st_ino), []).append(fd)
    for fds in pipes.values():
        copy = _Copy(os.dup(fds[0]))
        for fd in fds:
            os.dup2(copy.write, fd)  # inheritable again: children write through the copy too
        os.close(copy.write)
        atexit.register(copy.drain, fds)


class _Copy:
    """One pipe's copy thread (`outlive_the_reader`)."""

    def __init__(self, real: int):
        import threading

        self.real, self.alive = real, True  # alive: the reader of `real` is still there
        self.read, self.write = os.pipe()
        self.thread = threading.Thread(target=self.run, daemon=True, name="output copy")
        self.thread.start()

    def run(self) -> None:
        while chunk := os.read(self.read, 1 << 16):
            view = memoryview(chunk)
            while self.alive and view:
                try:
                    view = view[os.write(self.real, view):]
                except OSError:  # EPIPE: the reader is gone; discard from now on
                    self.alive = False

    def drain(self, fds: list[int]) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        null = os.open(os.devnull, os.O_WRONLY)
        for fd in fds:
            os.dup2(null, fd)  # our write end closed: the copy reads to the end (children's ends aside)
        self.thread.join(timeout=5)
        for fd in fds:  # the last words (Python's own flush at exit) where they can still be read
            os.dup2(self.real if self.alive else null, fd)
        os.close(null)


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# The guard between a worker and its stage: `python -c GUARD FD COMMAND...` starts COMMAND in a process
# group of its own and watches FD, the read end of a pipe whose only write end the starting process
# holds. End-of-file there means that process is gone (the kernel closes a dead process's descriptors,
# however it died): the guard then stops the whole group, SIGTERM first (a stage ends its MLflow run
# KILLED and removes its temporaries; a stage served by stages/server.py has it forwarded to its fork,
# and a fork whose command is gone kills itself), SIGKILL after GUARD_GRACE_S for what is left. SIGINT,
# SIGTERM and SIGHUP sent to the guard reach the group. Otherwise it ends as COMMAND did. Standard
# library only and given as source: it starts in milliseconds and needs no import path.
GUARD_GRACE_S = 10.0
GUARD = r"""# tactic stage guard (pipeline/stages.py)
import os, select, signal, subprocess, sys, time

def group(pgid, signum):  # False once no process is left in the group (signal 0 only asks)
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True

fd, grace, command = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
child = subprocess.Popen(command, start_new_session=True)
for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(signum, lambda s, _f: group(child.pid, s))
try:
    ended = [os.pidfd_open(child.pid)]  # readable once COMMAND ends: no polling delay at its end
except (AttributeError, OSError):
    ended = []
while child.poll() is None:
    try:
        ready = select.select([fd, *ended], [], [], 0.5)[0]
    except InterruptedError:
        continue
    if fd in ready and not os.read(fd, 1):
        group(child.pid, signal.SIGTERM)  # (nothing to print: whoever read the output is gone)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:  # the group, not only COMMAND: the stage under `dvc` takes a moment
            child.poll()  # reaps COMMAND once it ends, so that it leaves the group
            if not group(child.pid, 0):
                break
            time.sleep(0.1)
        else:
            group(child.pid, signal.SIGKILL)
        child.wait()
        sys.exit(1)
if child.returncode < 0:  # end as COMMAND did, by its signal
    signal.signal(-child.returncode, signal.SIG_DFL)
    os.kill(os.getpid(), -child.returncode)
sys.exit(child.returncode)
"""


def run_guarded(command: list[str], cwd: str | Path, env: dict) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True)`, except that the command, its whole
    process group, is stopped (SIGTERM, then SIGKILL) if this process dies before it ends (`GUARD`).
    A process forked from this one without exec would hold the pipe open; Dask workers, Prefect and
    kfp.local start their children with exec."""
    read, write = os.pipe()  # not inheritable: no other child of this process holds `write`
    try:
        proc = subprocess.Popen([sys.executable, "-c", GUARD, str(read), str(GUARD_GRACE_S), *map(str, command)], cwd=cwd, env=env,
                                pass_fds=(read,), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(read)
    try:
        out, err = proc.communicate()
    finally:
        os.close(write)  # interrupted here (an exception, a cancelled task): the guard stops the command
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def run_dvc_stage(name: str, root: str | Path, env: dict, attempts: int = 30, command: list[str] | None = None) -> tuple[str, str]:
    """`dvc repro -s <name>` (through pipeline.repro); returns ("ran" | "skipped", output of every attempt). Lock conflicts with
    concurrent DVC processes are retried after a jittered, growing wait (so tasks that collided do not
    collide again); any other failure raises with the end of its output."""
    command = command or [sys.executable, "-m", "pipeline.repro", "-s", name]  # `dvc repro -s`, its lock by libyaml
    outputs = []
    for attempt in range(attempts):
        proc = run_guarded(command, root, env)
        output = proc.stdout + proc.stderr
        outputs.append(output)
        if proc.returncode == 0:
            return ("skipped" if "didn't change, skipping" in output else "ran"), RETRIED.join(outputs)
        if not any(m in output for m in LOCK_MESSAGES):
            raise StageFailed(f"stage {name} failed (exit {proc.returncode}):\n{tail(output)}", output)
        time.sleep(random.uniform(0.2, 1.0) * min(attempt + 1, 5))
    raise StageFailed(f"stage {name}: DVC lock still held after {attempts} attempts:\n{tail(output)}")


def stop_groups(procs: list[subprocess.Popen], timeout: float = 30) -> None:
    """End servers and clusters started with `start_new_session`, last started first, each before the
    next: SIGTERM its process group, then SIGKILL the group if it still runs after `timeout` s. A Dask
    worker (`--no-nanny`) stopped together with its scheduler could hang for good in its exit: the
    scheduler's close message started the worker's close, which the SIGTERM exit then cancelled
    halfway (2 of 6 runs of the cluster test; none of 4 with the workers first, each out in ~1 s)."""
    for p in reversed(procs):
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
