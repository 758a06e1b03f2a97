"""The same DVC stages as a Kubeflow Pipelines pipeline: one task per stage entry of dvc.yaml.

    pip install -e '.[kubeflow]'
    tactic kubeflow compile --profile smoke -o tactic.yaml --image registry/tactic:latest --pvc tactic-workspace

The graph is DVC's own (`dvc.repo.Repo(...).index.graph` for the params in effect: run it after
`tactic profile NAME`, or give `--profile`, which is applied to params.yaml first as `tactic profile`
does), so the pipeline has exactly the stages of `dvc stage list` and the edges of `dvc dag`. Every
task runs `dvc repro --single-item <stage>` in the project's image, in the repository checked out on
a shared volume (a PVC, mounted by kfp-kubernetes at `--workspace`), so DVC decides what is up to
date, as in the Prefect flow; KFP's own caching is off, so no task reuses a result DVC would redo.
The MLflow tracking URI comes from the cluster (`--mlflow-uri`, e.g. an MLflow tracking server).
Compiling needs no cluster; submitting the YAML (KFP UI, or `kfp.Client(host).create_run_from_pipeline_package`)
is untested here (no cluster on these machines).
"""

import argparse
from pathlib import Path

from tactic.config import ROOT


def dvc_graph(root: Path = ROOT) -> dict[str, list[str]]:
    """{stage entry: the entries it depends on}, from DVC itself."""
    import warnings

    from dvc.repo import Repo

    with Repo(str(root)) as repo, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # DVC's own internals (pygtrie), hundreds per graph
        graph = repo.index.graph  # edges go from a stage to the stages whose outputs it reads
        return {stage.name: sorted(dep.name for dep in graph.successors(stage)) for stage in graph.nodes}


def build(graph: dict[str, list[str]], image: str, pvc: str, workspace: str, mlflow_uri: str):
    """A KFP pipeline function with one container task per stage, run after the stages it needs."""
    from kfp import dsl, kubernetes

    @dsl.container_component
    def dvc_stage(name: str):
        return dsl.ContainerSpec(image=image, command=["sh", "-c"],
                                 args=[f'cd {workspace} && dvc repro --single-item "$0"', name])

    @dsl.pipeline(name="tactic", description="The TACTIC experiment: every DVC stage of dvc.yaml, one task each")
    def tactic():
        tasks = {}
        for name in _topological(graph):
            task = dvc_stage(name=name).set_display_name(name).set_caching_options(False)
            task.set_env_variable("MLFLOW_TRACKING_URI", mlflow_uri)
            kubernetes.mount_pvc(task, pvc_name=pvc, mount_path=workspace)
            for need in graph[name]:
                task.after(tasks[need])
            tasks[name] = task

    return tactic


def _topological(graph: dict[str, list[str]]) -> list[str]:
    order, seen = [], set()

    def visit(name):
        if name not in seen:
            seen.add(name)
            for need in graph[name]:
                visit(need)
            order.append(name)

    for name in sorted(graph):
        visit(name)
    return order


def compile_pipeline(out: Path, root: Path = ROOT, image: str = "tactic:latest", pvc: str = "tactic-workspace",
                     workspace: str = "/workspace", mlflow_uri: str = "http://mlflow:5000") -> dict[str, list[str]]:
    from kfp import compiler

    graph = dvc_graph(root)
    compiler.Compiler().compile(build(graph, image, pvc, workspace, mlflow_uri), str(out))
    return graph


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tactic kubeflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["compile"])
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
    graph = compile_pipeline(args.out, args.root.resolve(), args.image, args.pvc, args.workspace, args.mlflow_uri)
    print(f"{args.out}: {len(graph)} tasks, {sum(map(len, graph.values()))} dependencies (DVC's graph)")
    return 0
