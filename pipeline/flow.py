"""The whole pipeline as the Prefect flow `tactic`; its independent stages fan out on Dask.

    python -m pipeline.flow --profile smoke             # one run, here, on a local Dask cluster
    python -m pipeline.serve                            # serve the deployment `tactic/full`
    prefect deployment run tactic/full --param profile=smoke --param 'seeds=[0, 1]'

Parameters (all optional): `profile` (a file in profiles/, merged over params.yaml), `dataset`,
`seeds`, `betas`, and `params`, a nested dict of any other params.yaml keys. They are validated by
the params schema before any stage starts, then written into params.yaml (as `dvc exp run -S`
does), because DVC decides from params.yaml what is up to date.

Every task runs one DVC stage with `dvc repro -s`, after the stages it needs; the grid's independent
stages run concurrently on the flow's Dask task runner: a local cluster (one single-threaded worker
per core by default, `TACTIC_DASK_WORKERS`) or the scheduler at `TACTIC_DASK_ADDRESS`.
One MLflow parent run per flow run holds the stage runs, nested.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import Optional

import dask
from prefect import flow, get_run_logger, task
from prefect.futures import wait
from prefect.runtime import flow_run as current_flow_run
from prefect_dask import DaskTaskRunner

from pipeline.stages import run_dvc_stage, stage_env, stage_graph, stage_priority, stage_threads
from tactic import tracking
from tactic.config import ROOT, parse_params
from tactic.profiles import resolve_params, write_params


def make_task_runner(address: Optional[str] = None, workers: Optional[int] = None) -> DaskTaskRunner:
    """A Dask runner: the scheduler at `address`, else a local cluster of single-threaded worker processes."""
    address = address or os.environ.get("TACTIC_DASK_ADDRESS")
    if address:
        return DaskTaskRunner(address=address)
    workers = workers or int(os.environ.get("TACTIC_DASK_WORKERS", 0)) or os.cpu_count()
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


@task(name="stage", task_run_name="{name}", retries=0)
def dvc_stage(name: str, root: str, env: dict) -> str:
    logger = get_run_logger()
    status, output = run_dvc_stage(name, root, env)
    logger.info("%s %s on %s\n%s", name, status, _where(), "\n".join(output.strip().splitlines()[-5:]) if status == "ran" else "")
    return status


def _where() -> str:
    """The Dask worker running this task (its address), else this process."""
    try:
        from distributed import get_worker

        return f"Dask worker {get_worker().address} (pid {os.getpid()})"
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


@flow(name="tactic", task_runner=make_task_runner(), log_prints=True)
def tactic(profile: Optional[str] = None, dataset: Optional[str] = None, seeds: Optional[list[int]] = None,
           betas: Optional[list[float]] = None, params: Optional[dict] = None) -> dict:
    """Run every stage of the TACTIC pipeline that is not up to date; returns {stage: "ran" | "skipped"}."""
    root = ROOT
    raw = resolve_params(root, profile, dataset, seeds, betas, params)
    write_params(root / "params.yaml", raw)
    graph = stage_graph(parse_params(raw))
    flow_run_id = str(current_flow_run.id or "local")
    with tracking.start_run(f"flow {current_flow_run.name or 'local'}", None, {"profile": profile, "stages": len(graph)},
                            tags={"prefect_flow_run_id": flow_run_id}) as parent:
        # Stages share the cores: one lane per local Dask worker (`stage_threads`).
        threads = stage_threads(graph, int(os.environ.get("TACTIC_DASK_WORKERS", 0)) or os.cpu_count())
        priority = stage_priority(graph)  # Dask starts the ready task of highest priority first
        env = stage_env({"TACTIC_PARENT_RUN_ID": parent.info.run_id})
        futures = {}
        for name, needs in graph.items():
            with dask.annotate(priority=priority[name]):
                futures[name] = dvc_stage.submit(name, str(root), {**env, "TACTIC_THREADS": threads[name]},
                                                 wait_for=[futures[n] for n in needs])
        _show_progress(futures)
        # After a failure too, every task ends before the flow does (the stages that do not need the
        # failed one run to the end, those that do end NotReady): leaving the flow closes its Dask
        # cluster, and the stages still running on its workers would be stopped with them (run_guarded).
        wait(list(futures.values()))
        statuses = {name: f.result() for name, f in futures.items()}
        tracking.log_metrics({"stages_ran": sum(s == "ran" for s in statuses.values()), "stages_skipped": sum(s == "skipped" for s in statuses.values())})
        _publish_results(root, parent)
    print(f"{sum(s == 'ran' for s in statuses.values())} stages ran, {sum(s == 'skipped' for s in statuses.values())} up to date; "
          f"MLflow parent run {parent.info.run_id}")
    return statuses


def _show_progress(futures: dict, every: float = 2.0) -> None:
    """A progress artifact in the flow run (stages done of all) until every stage ends or one fails.
    Read from the Dask futures, which live in this process: a Prefect future's `state` asks the API
    for its task run on every read, and 61 of them every 2 s kept the server busy on the stages' cores
    (the flow's stages took 1.42x `pipeline.repro --jobs`'s time inside their own runs)."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    artifact = create_progress_artifact(0.0, key="tactic-progress", description=f"stages done, of {len(futures)}")
    done: set = set()
    while True:
        for name, future in futures.items():
            if name not in done and future.wrapped_future.done():
                future.wait()  # keeps the final state the task returned: `state` asks nothing more
                done.add(name)
                update_progress_artifact(artifact, 100.0 * len(done) / len(futures),
                                         description=f"{len(done)} of {len(futures)} stages done")
                if not future.state.is_completed():
                    return
        if len(done) == len(futures):
            return
        time.sleep(every)


def _publish_results(root, parent) -> None:
    """The results where Prefect users look: the report's table and headline figures as a markdown
    artifact of the flow run, and a link to its MLflow parent run (`TACTIC_MLFLOW_UI`: the UI's URL)."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    results = root / "results"
    if (results / "table.md").is_file():
        create_markdown_artifact(key="tactic-results", description="results/table.md and results/summary.md",
                                 markdown=f"## Operating points\n\n{(results / 'table.md').read_text()}\n"
                                          f"## Headline figures\n\n{(results / 'summary.md').read_text()}")
    ui = os.environ.get("TACTIC_MLFLOW_UI", "http://127.0.0.1:5000")
    create_link_artifact(key="tactic-mlflow", link=f"{ui}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}",
                         link_text="MLflow parent run", description="the flow's MLflow run, its stage runs nested")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile")
    ap.add_argument("--workers", type=int, help="local Dask workers (default: one per core)")
    ap.add_argument("--dask-address", help="an existing Dask scheduler, e.g. tcp://10.0.0.5:8786")
    args = ap.parse_args(argv)
    if args.workers:
        os.environ["TACTIC_DASK_WORKERS"] = str(args.workers)
    from stages import server

    server.start(idle=600, wait=0)  # stages fork from it instead of paying their imports (stages/server.py)
    runner = make_task_runner(args.dask_address, args.workers)
    with shared_api():
        tactic.with_options(task_runner=runner)(profile=args.profile)


@contextlib.contextmanager
def shared_api():
    """One Prefect API for the flow and all its tasks. Without one configured (`PREFECT_API_URL`),
    Prefect starts a temporary server in the flow's process, and every Dask worker process, its own
    local cluster's included, would start a temporary server of its own (~10 s each, on the cores the
    stages need) and record its task runs there, out of the flow run's sight. So the temporary server
    is started here and named in the settings that travel with every task. It listens on 127.0.0.1:
    workers on other machines need a real server (`PREFECT_API_URL`)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    api = SubprocessASGIServer()  # the instance Prefect's own client would start; stopped at exit
    # It took 6.7-15.8 s on 2 cores (benchmarks/orchestration.py prints it): Prefect's default wait,
    # 20 s, is too close.
    t0 = time.perf_counter()
    api.start(timeout=max(120, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
    print(f"temporary Prefect server at {api.api_url}, started in {time.perf_counter() - t0:.1f} s", flush=True)
    with temporary_settings(updates={PREFECT_API_URL: api.api_url}):
        yield


if __name__ == "__main__":
    main()
