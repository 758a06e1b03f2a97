"""The same DVC stages as a Kubeflow Pipelines pipeline: one task per stage entry of dvc.yaml.

    pip install -e '.[kubeflow]'
    tactic kubeflow compile --profile smoke -o tactic.yaml --image registry/tactic:latest --pvc tactic-workspace

The graph is DVC's own (`dvc.repo.Repo(...).index.graph` for the params in effect: run it after
`tactic profile NAME`, or give `--profile`, which is applied to params.yaml first as `tactic profile`
does), so the pipeline has exactly the stages of `dvc stage list` and the edges of `dvc dag`. Every
task runs `dvc repro --single-item <stage>` (as `python -m pipeline.repro`) in the project's image, in the repository checked out on
a shared volume (a PVC, mounted by kfp-kubernetes at `--workspace`), so DVC decides what is up to
date, as in the Prefect flow; KFP's own caching is off, so no task reuses a result DVC would redo.
The MLflow tracking URI comes from the cluster (`--mlflow-uri`, e.g. an MLflow tracking server).
Compiling needs no cluster; submitting the YAML (KFP UI, or `kfp.Client(host).create_run_from_pipeline_package`)
is untested here (no cluster on these machines).

    tactic kubeflow run-local [--profile smoke]

runs the same graph here through `kfp.local` (KFP's local runner, `SubprocessRunner`): one
lightweight Python component per stage entry, each calling the same `dvc repro --single-item
<stage>` in this checkout, after the tasks it needs (`.after()`). kfp.local runs the tasks one at a
time, in a topological order, with this Python; it stops at the first task that fails.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from pipeline.stages import dvc_graph
from tactic.config import ROOT


def build(graph: dict[str, list[str]], image: str, pvc: str, workspace: str, mlflow_uri: str):
    """A KFP pipeline function with one container task per stage, run after the stages it needs."""
    from kfp import dsl, kubernetes

    @dsl.container_component
    def dvc_stage(name: str):
        return dsl.ContainerSpec(image=image, command=["sh", "-c"],
                                 args=[f'cd {workspace} && python -m pipeline.repro --single-item "$0"', name])

    @dsl.pipeline(name="tactic", description="The TACTIC experiment: every DVC stage of dvc.yaml, one task each")
    def tactic():
        tasks = {}
        for name in graph:
            task = dvc_stage(name=name).set_display_name(name).set_caching_options(False)
            task.set_env_variable("MLFLOW_TRACKING_URI", mlflow_uri)
            kubernetes.mount_pvc(task, pvc_name=pvc, mount_path=workspace)
            for need in graph[name]:
                task.after(tasks[need])
            tasks[name] = task

    return tactic


def _local_stage(name: str, root: str) -> str:
    """A kfp.local task: the stage entry `name` in the checkout at `root`; returns "ran" or "skipped".
    KFP runs this function's source on its own, so it imports what it needs itself."""
    import sys

    sys.path.insert(0, root)  # this checkout's code (pipeline.stages: the standard library only)
    from pipeline.stages import run_dvc_stage, stage_env

    status, output = run_dvc_stage(name, root, stage_env())  # dvc repro --single-item <name>, lock conflicts retried
    print(f"{name}: {status}\n" + "\n".join(output.strip().splitlines()[-5:]))
    return status


def build_local(graph: dict[str, list[str]], root: Path):
    """A KFP pipeline for kfp.local: one lightweight Python component task per stage, after the tasks
    of the stages it needs, KFP caching off (DVC decides what is up to date)."""
    from kfp import dsl

    # No `pip install kfp` before each task (what lightweight components do by default): this
    # environment has it, and kfp.local's SubprocessRunner(use_venv=False) runs tasks with this Python.
    stage = dsl.component(_local_stage, base_image="python:3.11", install_kfp_package=False)

    @dsl.pipeline(name="tactic-local", description="The TACTIC experiment through kfp.local: every DVC stage, one task each")
    def tactic():
        tasks = {}
        for name in graph:
            task = stage(name=name, root=str(root)).set_caching_options(False)
            for need in graph[name]:
                task.after(tasks[need])
            tasks[name] = task

    return tactic


def run_local(root: Path = ROOT, pipeline_root: Path | None = None) -> dict[str, str]:
    """DVC's graph of the checkout at `root` through kfp.local; {stage: "ran" | "skipped"}, in the
    order of DVC's graph. KFP's task outputs are kept in `pipeline_root` if given (else in a temporary
    folder, removed after); the tasks' logs go to this process's output."""
    if pipeline_root is None:
        with tempfile.TemporaryDirectory(prefix="tactic-kfp-") as tmp:
            return run_local(root, Path(tmp))
    import json

    from kfp import local

    from pipeline.stages import StageFailed

    root = Path(root).resolve()
    graph = dvc_graph(root)
    pipeline_root = Path(pipeline_root)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    pipeline = build_local(graph, root)
    tasks = pipeline.pipeline_spec.root.dag.tasks  # KFP's task names ("local-stage-3") -> stage entries
    stages = {key: task.inputs.parameters["name"].runtime_value.constant.string_value for key, task in tasks.items()}
    try:
        pipeline()
    except RuntimeError as err:  # "... Inner task failed: <KFP task name>.": name the stage
        failed = [f"{stages[key]} (task {key})" for key in stages if f"'{key}'" in str(err)]
        raise StageFailed(f"{err} Stage: {', '.join(failed) or 'unknown'}; its output is in the log above") from err
    run = max(pipeline_root.glob("tactic-local-*"), key=lambda d: d.stat().st_mtime)  # this run's task outputs
    outputs = {key: json.loads((run / key / "executor_output.json").read_text())["parameterValues"]["Output"] for key in stages}
    order = {name: i for i, name in enumerate(graph)}
    return dict(sorted(((stages[key], status) for key, status in outputs.items()), key=lambda kv: order[kv[0]]))


def compile_pipeline(out: Path, root: Path = ROOT, image: str = "tactic:latest", pvc: str = "tactic-workspace",
                     workspace: str = "/workspace", mlflow_uri: str = "http://mlflow:5000") -> dict[str, list[str]]:
    from kfp import compiler

    graph = dvc_graph(root)
    compiler.Compiler().compile(build(graph, image, pvc, workspace, mlflow_uri), str(out))
    return graph


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tactic kubeflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["compile", "run-local"], help="compile: write the KFP YAML; run-local: run it here through kfp.local")
    ap.add_argument("-o", "--out", type=Path, default=Path("tactic.yaml"))
    ap.add_argument("--profile", help="apply profiles/<NAME>.yaml to params.yaml first (as `tactic profile`)")
    ap.add_argument("--root", type=Path, default=Path("."), help="the repository (default: here)")
    ap.add_argument("--image", default="tactic:latest", help="an image with this project installed")
    ap.add_argument("--pvc", default="tactic-workspace", help="the PVC holding the repository checkout")
    ap.add_argument("--workspace", default="/workspace", help="where the PVC is mounted in each task")
    ap.add_argument("--mlflow-uri", default="http://mlflow:5000", help="MLFLOW_TRACKING_URI of every task")
    args = ap.parse_args(argv)
    if args.profile:
        from tactic import profiles

        if profiles.main([args.profile, "--params", str(args.root / "params.yaml")]):
            return 1
    if args.action == "run-local":
        from pipeline.stages import StageFailed
        from stages import server

        server.start(idle=600, wait=0)  # stages fork from it instead of paying their imports (stages/server.py)
        try:
            statuses = run_local(args.root)
        except StageFailed as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print("\n".join(f"{stage}: {status}" for stage, status in statuses.items()))
        print(f"{sum(s == 'ran' for s in statuses.values())} stages ran, {sum(s == 'skipped' for s in statuses.values())} up to date (kfp.local)")
        return 0
    graph = compile_pipeline(args.out, args.root.resolve(), args.image, args.pvc, args.workspace, args.mlflow_uri)
    print(f"{args.out}: {len(graph)} tasks, {sum(map(len, graph.values()))} dependencies (DVC's graph)")
    return 0
