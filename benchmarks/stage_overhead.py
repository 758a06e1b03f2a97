"""What a stage costs besides its work, with and without the stage server, as ratios in one run.

    python benchmarks/stage_overhead.py [--repeats 5] [--profiles smoke,default]

Against the same machine's `python -c pass`, measured in this run:
  (a) importing what a stage needs (torch, torchvision, CompressAI, MLflow, the project's modules);
  (b) a no-op stage through the project's entry point: the stage-server hand-off, params validated,
      an MLflow run opened and closed; as a process of its own and served by the stage server;
  (c) DVC's own bookkeeping for one stage: `dvc repro -f` of a stage whose command is `python -c pass`;
      and its update of a full-size lock file (`--lock`, by default this checkout's dvc.lock, e.g. after
      `make run`): DVC's round-trip parse and write against pipeline.repro's libyaml ones;
  (d) for each profile, `python -m pipeline.repro` (serial `dvc repro`; `make run` runs `--jobs`, whose
      stages overlap, so their loop times add up to more than the wall time) in a fresh copy
      of the repo with the stage server: the time inside
      the training and evaluation loops (the `train_seconds` and `eval_seconds` the stages log to
      MLflow) over the wall time of `dvc repro`, the work fraction;
  (e) in that copy, now up to date, a run that has nothing to do: DVC's own `dvc repro` (one process
      checks every stage) against `pipeline.repro --jobs 2` (`make run`'s), which starts a DVC process
      only for the stages DVC would not skip (`pipeline.stages.fresh_at_start`).
The server used for (b) and (d) is a private one (its socket in a temporary folder), started here.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

from benchmarks.orchestration import copy_repo  # noqa: E402

NOOP_STAGE = """from stages.server import handoff

handoff(__name__)

import argparse
from stages import cli
from tactic import tracking

args, p = cli.parse(argparse.ArgumentParser())
with tracking.start_run("noop", "noop", {"stage": "noop"}):
    pass
"""
IMPORTS = "import torch, torchvision, compressai, mlflow, tactic.experiment.run, tactic.codecs.codec, tactic.tracking"


def median_time(cmd, cwd, env, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if proc.returncode:
            sys.exit(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return statistics.median(times)


def work_seconds(db: Path) -> float:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(experiment_names=["tactic"])
    return float(sum(runs.get(f"metrics.{k}", 0).fillna(0).sum() for k in ("train_seconds", "eval_seconds")))


def lock_update(lock: Path, repeats: int) -> None:
    """What DVC does to dvc.lock after each stage (parse it, write it back), with DVC's round-trip YAML
    and with pipeline.repro's libyaml, on the same lock."""
    import io

    from dvc.utils.serialize._yaml import _dump, parse_yaml, parse_yaml_for_update
    from pipeline.repro import dump_lock

    text = lock.read_text()

    def best(fn):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    slow = best(lambda: _dump(parse_yaml_for_update(text, lock), io.StringIO()))
    fast = best(lambda: dump_lock(parse_yaml(text, lock), io.StringIO()))
    stages = len(parse_yaml(text, lock).get("stages", {}))
    print(f"    its update of {lock} ({len(text) / 1024:.0f} KB, {stages} stages): DVC's round-trip YAML "
          f"{slow:.2f} s, libyaml (pipeline.repro) {fast:.2f} s  -> {slow / fast:.1f}x faster")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profiles", default="smoke", help="comma-separated profiles for (d); 'default' takes ~14 min")
    ap.add_argument("--lock", type=Path, default=ROOT / "dvc.lock", help="a dvc.lock for (c)'s lock update")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tso", dir="/tmp", ignore_cleanup_errors=True) as tmp:  # the server may still log
        tmp = Path(tmp)
        env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "TACTIC_STAGE_SERVER")}
        env.update(PATH=f"{BIN}:{os.environ['PATH']}", TMPDIR=str(tmp), MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/noop.db",
                   PYTHONPATH=str(ROOT))
        off = {**env, "TACTIC_STAGE_SERVER": "0"}
        (tmp / "noop_stage.py").write_text(NOOP_STAGE)
        base = median_time([sys.executable, "-c", "pass"], tmp, env, args.repeats)
        imports = median_time([sys.executable, "-c", IMPORTS], tmp, env, args.repeats)
        noop = median_time([sys.executable, "-m", "noop_stage"], tmp, off, args.repeats)
        subprocess.run([sys.executable, "-m", "stages.server", "start", "--wait", "120"], cwd=ROOT, env=env, check=True,
                       capture_output=True)
        try:
            median_time([sys.executable, "-m", "noop_stage"], tmp, env, 1)  # the MLflow database is made once
            served = median_time([sys.executable, "-m", "noop_stage"], tmp, env, args.repeats)
            dvc_repo = tmp / "dvc"
            dvc_repo.mkdir()
            subprocess.run(["git", "init", "-q"], cwd=dvc_repo, check=True)
            subprocess.run([BIN / "dvc", "init", "-q"], cwd=dvc_repo, check=True, env=env)
            (dvc_repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"noop": {"cmd": "python -c pass"}}}))
            dvc = median_time([BIN / "dvc", "repro", "-f", "noop"], dvc_repo, env, args.repeats)
            print(f"python -c pass                        {base:6.2f} s  1.0x")
            print(f"(a) imports of a stage                {imports:6.2f} s  {imports / base:5.1f}x")
            print(f"(b) no-op stage, own process          {noop:6.2f} s  {noop / base:5.1f}x  ({noop - base:.2f} s beyond python -c pass)")
            print(f"    no-op stage, stage server         {served:6.2f} s  {served / base:5.1f}x  ({served - base:.2f} s beyond)"
                  f"  -> {noop / served:.1f}x faster")
            print(f"(c) dvc repro -f of a `python -c pass` stage {dvc:6.2f} s  {dvc / base:5.1f}x  "
                  f"(DVC's own: {dvc - base:.2f} s a stage)")
            if args.lock.is_file():
                lock_update(args.lock, args.repeats)
            for profile in filter(None, args.profiles.split(",")):
                repo = copy_repo(tmp / profile, profile)
                db = tmp / f"{profile}.db"
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "pipeline.repro"], cwd=repo, env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"},
                                      capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if proc.returncode:
                    sys.exit(f"pipeline.repro ({profile}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                stages = proc.stdout.count("Running stage")
                work = work_seconds(db)
                print(f"(d) {profile}: dvc repro {wall:.1f} s for {stages} stages, {work:.1f} s inside training and "
                      f"evaluation loops: work fraction {work / wall:.2f} ({(wall - work) / stages:.2f} s a stage besides)")
                penv = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
                dvc_noop = median_time([BIN / "dvc", "repro"], repo, penv, args.repeats)
                jobs_noop = median_time([sys.executable, "-m", "pipeline.repro", "--jobs", "2"], repo, penv, args.repeats)
                print(f"(e) {profile}, nothing to do: dvc repro {dvc_noop:.1f} s, pipeline.repro --jobs 2 {jobs_noop:.1f} s "
                      f"({jobs_noop / dvc_noop:.2f}x)")
                kept = Path("/tmp") / f"stage_overhead_{profile}_table.md"  # to compare with the README's
                kept.write_text((repo / "results" / "table.md").read_text())
                print(f"    its results/table.md: {kept}")
        finally:
            subprocess.run([sys.executable, "-m", "stages.server", "stop"], cwd=ROOT, env=env, capture_output=True)


if __name__ == "__main__":
    main()
