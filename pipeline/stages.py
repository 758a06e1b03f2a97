"""Running one DVC stage from a flow: the stage graph, and `dvc repro -s` with lock retries.

DVC stays the single source of truth for what is up to date: every task runs one stage (one matrix
entry) with `dvc repro -s`, which skips it when its deps and params are unchanged.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

from tactic.config import Params
from tactic.experiment.grid import pretrain_runs, task_runs

# DVC's two lock errors: the repository lock (one `dvc` command at a time changes .dvc/), and the
# rwlock of a stage's paths (another stage is writing what this one reads, or the reverse).
LOCK_MESSAGES = ("Unable to acquire lock", "is busy, it is being blocked by")


class StageFailed(RuntimeError):
    pass


def stage_graph(p: Params) -> dict[str, list[str]]:
    """Every stage of dvc.yaml for these params, with the stages it needs, in a runnable order."""
    graph = {"prepare": [], "weights": []}  # `weights`: hashes of the files params name (stages/weights.py)
    for r in pretrain_runs(p):
        graph[r.stage] = ["prepare"] + (["weights"] if r.mode == "pretrain-hyperprior" else [])
    runs = task_runs(p)
    for r in runs:
        graph[r.stage] = ["prepare", "weights"] + ([r.codec_run.stage] if r.codec_run else [])
    graph["evaluate"] = [r.stage for r in runs]
    graph["report"] = ["evaluate"]
    return graph


def stage_env(extra: dict | None = None) -> dict:
    """The environment of a stage process: this interpreter's bin first, since DVC commands call `python`."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_dvc_stage(name: str, root: str | Path, env: dict, attempts: int = 30, command: list[str] | None = None) -> tuple[str, str]:
    """`dvc repro -s <name>`; returns ("ran" | "skipped", output of every attempt). Lock conflicts with
    concurrent DVC processes are retried after a jittered, growing wait (so tasks that collided do not
    collide again); any other failure raises with the end of its output."""
    command = command or [str(Path(sys.executable).parent / "dvc"), "repro", "-s", name]
    outputs = []
    for attempt in range(attempts):
        proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
        output = proc.stdout + proc.stderr
        outputs.append(output)
        if proc.returncode == 0:
            return ("skipped" if "didn't change, skipping" in output else "ran"), "\n".join(outputs)
        if not any(m in output for m in LOCK_MESSAGES):
            raise StageFailed(f"stage {name} failed (exit {proc.returncode}):\n{tail(output)}")
        time.sleep(random.uniform(0.2, 1.0) * min(attempt + 1, 5))
    raise StageFailed(f"stage {name}: DVC lock still held after {attempts} attempts:\n{tail(output)}")
