"""Orchestration overhead: the same profile through `dvc repro`, the Prefect flow on Dask, and kfp.local.

    python benchmarks/orchestration.py [--profile smoke] [--workers 2] [--skip cluster,kfp] [--baseline dvc] [--aba [--rounds N]]

Runs each in a fresh copy of the repo (so none finds another's outputs): first the serial baseline,
`dvc repro` (DVC alone; `--baseline repro`, the default: as `make run` ran it, `python -m
pipeline.repro`, whose lock file libyaml writes, as every flow and KFP task's does; `--baseline dvc`:
DVC's own `dvc repro`, which rewrites `dvc.lock` with its round-trip YAML after every stage, and then
`python -m pipeline.repro` as a leg of its own), then
- `jobs`: `python -m pipeline.repro --jobs WORKERS`, the same stages `--workers` at a time, each a
  `dvc repro -s` of its own with cores // workers torch threads (what `make run` runs since then);
- `flow`: the `tactic` flow on its own local Dask cluster (`--workers` single-threaded workers,
  threads of the flow's process; a temporary Prefect server);
- `cluster`: the same flow on a Dask cluster started beforehand as separate processes on loopback
  (`dask scheduler`, `--workers` x `dask worker --nthreads 1`), given by `--dask-address`, as on a
  real cluster; the time to start the cluster is printed apart, not counted;
- `kfp`: `tactic kubeflow run-local`, DVC's graph through kfp.local (one task at a time),
and prints each wall time as a ratio to `dvc repro`'s in the same run (with `--aba`, `dvc repro` runs
again after the other legs and the ratios are taken against the mean of its two runs: this machine's
speed drifts by a third within an hour, and the second run shows by how much it did; `--rounds N`
alternates the other legs and `dvc repro` N times, each round against the runs around it, and prints
each leg's ratios and their mean), and for the parallel legs how many
training stages ran at once (the most MLflow stage runs open at the same moment). On the smoke profile
the ratios show what Prefect, Dask and KFP add; on the default profile, whether the fan-out over the
cores beats DVC's serial run. Under each leg, where its time went (`phases`: the engine's start before
the first stage's MLflow run opened, the stages' span with the lane-seconds inside their runs and
between them, the engine's end), and the flow's temporary Prefect server's start-up.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from pipeline.stages import stop_groups
from tactic.profiles import resolve_params
from tactic.io import copy_tracked

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def copy_repo(dest: Path, profile: str) -> Path:
    copy_tracked(ROOT, dest)
    (dest / "params.yaml").write_text(yaml.safe_dump(resolve_params(ROOT, profile), sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


@dataclasses.dataclass
class Leg:
    seconds: float
    launched: float  # wall clock, to set against the MLflow runs' times
    ended: float
    output: str
    served: int  # commands the stage server forked during the leg


def _served() -> int:
    from stages import server

    info = server._ask("status")
    if info is None:  # a leg of normal processes beside served ones would be timed unlike them
        sys.exit("orchestration: the stage server stopped answering (see its log); the legs would not run alike")
    return info["served"]


def timed(cmd, cwd, env) -> Leg:
    before = _served()
    t0, launched = time.perf_counter(), time.time()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return Leg(time.perf_counter() - t0, launched, time.time(), proc.stdout, _served() - before)


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


def phases(db: str, launched: float, ended: float, lanes: int) -> str:
    """Where a leg's wall time went, from its stages' MLflow runs (each spans a stage's own work,
    start-up excluded): before the first stage's run opened (the engine's start: a Prefect server, a
    Dask cluster, the first stage's process), between the first opening and the last closing (of which
    the stages' runs fill `busy` lane-seconds; the rest of `lanes` x that span is the time lanes
    spent between stages: scheduling, task bookkeeping, stage processes starting and ending), and
    after the last run closed (the engine's end)."""
    import mlflow

    mlflow.set_tracking_uri(db)
    runs = mlflow.search_runs(experiment_names=["tactic"], filter_string="tags.dvc_stage != ''")
    first, last = runs["start_time"].min().timestamp(), runs["end_time"].max().timestamp()
    busy = (runs["end_time"] - runs["start_time"]).dt.total_seconds().sum()
    span = last - first
    gaps = lanes * span - busy
    return (f"start {first - launched:.1f} s, stages {span:.1f} s (their runs {busy:.1f} lane-s; between them "
            f"{gaps:.1f} lane-s, {gaps / len(runs):.2f} a stage over {len(runs)}), end {ended - last:.1f} s")


def start_cluster(tmp: Path, cwd: Path, env: dict, workers: int) -> tuple[str, list[subprocess.Popen]]:
    """A scheduler and `workers` single-threaded workers, processes of their own on 127.0.0.1; its address."""
    from distributed import Client

    file = tmp / "scheduler.json"
    procs = [subprocess.Popen([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(file)], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                              stderr=open(tmp / "scheduler.log", "w"), start_new_session=True)]
    procs += [subprocess.Popen([BIN / "dask", "worker", "--scheduler-file", str(file), "--host", "127.0.0.1", "--nthreads", "1",
                                "--no-dashboard"], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                               stderr=open(tmp / f"worker{i}.log", "w"), start_new_session=True) for i in range(workers)]
    deadline = time.time() + 60
    while not file.exists() and time.time() < deadline:
        time.sleep(0.2)
    with Client(scheduler_file=str(file), timeout=60) as client:
        client.wait_for_workers(workers, timeout=60)
    return json.loads(file.read_text())["address"], procs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--skip", default="", help="comma-separated: repro, jobs, flow, cluster, kfp (the baseline always runs)")
    ap.add_argument("--aba", action="store_true", help="run dvc repro again at the end; ratios against the mean of both")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --aba: the other legs and a dvc repro after them, this many times (dvc, legs, dvc, legs, dvc...)")
    ap.add_argument("--baseline", choices=("repro", "dvc"), default="repro",
                    help="the serial run the ratios are against: `python -m pipeline.repro` or DVC's own `dvc repro`")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds: at least 1")
    if args.rounds > 1 and not args.aba:
        ap.error("--rounds needs --aba: each round's ratios are against the dvc repro runs before and after it")
    skip = {s for s in args.skip.split(",") if s}
    # Every engine runs its stages as `make run` does, forked from the stage server (the flow would
    # start one anyway): without it `dvc repro` alone pays ~8 s of imports a stage and loses unfairly.
    from stages import server

    if server.start(idle=3600, wait=120):  # it said why; unserved, every leg would pay ~8 s of imports a stage
        sys.exit("orchestration: no stage server: the legs would not run as `make run` runs them")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PREFECT_HOME": str(tmp / "prefect"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TACTIC_DASK_WORKERS": str(args.workers)}
        base.pop("PREFECT_API_URL", None)  # a temporary local server, started by the flow itself

        def checkout(name):
            repo = copy_repo(tmp / name, args.profile)
            return repo, {**base, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/{name}.db", "PYTHONPATH": str(repo)}

        repro = [sys.executable, "-m", "pipeline.repro"]
        serial = [BIN / "dvc", "repro"] if args.baseline == "dvc" else repro
        named = "dvc repro (DVC's own)" if args.baseline == "dvc" else "dvc repro (as pipeline.repro)"
        repo, env = checkout("dvc")
        dvc = timed(serial, repo, env)
        t_dvc = dvc.seconds
        print(f"profile {args.profile}: {named} {t_dvc:.1f} s ({dvc.served} commands served)\n"
              f"    {phases(env['MLFLOW_TRACKING_URI'], dvc.launched, dvc.ended, 1)}", flush=True)

        def report(what, leg: Leg, env, extra="", lanes=args.workers):  # into this round's `legs`, against the last `t_dvc`
            legs.append((what, leg.seconds))
            db = env["MLFLOW_TRACKING_URI"]
            at_once = f"; training stages at once: at most {most_at_once(db)}" if "kfp" not in what else ""
            started = "".join(f"\n    {line}" for line in leg.output.splitlines() if "started in" in line)  # the flow's own server
            print(f"  {what}: {leg.seconds:.1f} s, ratio to {named} {leg.seconds / t_dvc:.2f}{at_once}{extra}; "
                  f"{leg.served} commands served\n"
                  f"    {phases(db, leg.launched, leg.ended, lanes)}{started}", flush=True)

        ratios: dict[str, list[float]] = {}  # leg -> its time over the mean of the dvc repro runs around it, by round
        for n in range(1, args.rounds + 1):
            legs = []
            suffix = f"-{n}" if args.rounds > 1 else ""
            if args.baseline == "dvc" and "repro" not in skip:
                repo, env = checkout("repro" + suffix)
                report("pipeline.repro (serial, libyaml's lock writer)", timed(repro, repo, env), env, lanes=1)
            if "jobs" not in skip:
                repo, env = checkout("jobs" + suffix)
                report(f"pipeline.repro --jobs {args.workers}",
                       timed([*repro, "--jobs", str(args.workers)], repo, env), env)
            if "flow" not in skip:
                repo, env = checkout("flow" + suffix)
                report(f"Prefect flow, its own local Dask cluster ({args.workers} workers)",
                       timed([sys.executable, "-m", "pipeline.flow", "--workers", str(args.workers)], repo, env), env)
            if "cluster" not in skip:
                repo, env = checkout("cluster" + suffix)
                t0 = time.perf_counter()
                address, procs = start_cluster(tmp, repo, env, args.workers)
                started = time.perf_counter() - t0
                try:
                    leg = timed([sys.executable, "-m", "pipeline.flow", "--dask-address", address], repo, env)
                finally:
                    stop_groups(procs)
                report(f"Prefect flow on a Dask cluster of separate processes ({args.workers} workers, --dask-address)", leg, env,
                       f" (the cluster took {started:.1f} s to start, not counted)")
            if "kfp" not in skip:
                repo, env = checkout("kfp" + suffix)
                report("kfp.local (tactic kubeflow run-local, one task at a time)", timed([BIN / "tactic", "kubeflow", "run-local"], repo, env), env,
                       lanes=1)
            if not args.aba:
                break
            repo, env = checkout("dvc-again" + suffix)
            again = timed(serial, repo, env)
            mean = (t_dvc + again.seconds) / 2
            this_round = {what.split(" (")[0]: seconds / mean for what, seconds in legs}
            print(f"{named} again: {again.seconds:.1f} s ({again.seconds / t_dvc:.2f}x the one before; {again.served} commands served)\n"
                  f"    {phases(env['MLFLOW_TRACKING_URI'], again.launched, again.ended, 1)}\n"
                  f"against the mean of both ({mean:.1f} s): "
                  + "; ".join(f"{what} {r:.2f} ({1 / r:.2f}x faster)" for what, r in this_round.items()), flush=True)
            for what, r in this_round.items():
                ratios.setdefault(what, []).append(r)
            t_dvc = again.seconds  # the next round's first baseline
        if args.rounds > 1:
            print(f"over {args.rounds} rounds, each against the {named} runs around it: " + "; ".join(
                f"{what} {', '.join(f'{r:.2f}' for r in rs)} (mean {sum(rs) / len(rs):.2f}, {len(rs) / sum(rs):.2f}x faster)"
                for what, rs in ratios.items()), flush=True)


if __name__ == "__main__":
    main()
