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
from typing import Optional

import dask
from prefect import flow, get_run_logger, task
from prefect.futures import wait
from prefect.runtime import flow_run as current_flow_run
from prefect_dask import DaskTaskRunner

from pipeline.stages import (dvc_graph, fresh_at_start, lock_outs, outlive_the_reader, run_dvc_stage, stage_env,
                             stage_priority, stage_threads, still_fresh)
from tactic import tracking
from tactic.config import ROOT
from tactic.profiles import resolve_params, write_params


# Dask's defaults suit workers that compute in Python; these wait on one stage process each. Its
# statistical profiler samples every worker thread's stack every 10 ms, a system monitor runs every
# 0.5 s and the event loops tick every 20 ms: a local cluster of two workers, each waiting on a
# subprocess, then burnt 4.0 CPU-seconds in 30 s (13 % of a core, taken from the stages on 2 cores);
# 0.5 with these. Set here, in the process that starts a local cluster (its workers inherit it); a
# cluster started elsewhere keeps its own config (README, "Scaling out").
dask.config.set({"distributed.worker.profile.enabled": False, "distributed.admin.tick.interval": "1s",
                 "distributed.admin.system-monitor.interval": "5s", "distributed.worker.memory.monitor-interval": "1s"})


def make_task_runner(address: Optional[str] = None, workers: Optional[int] = None) -> DaskTaskRunner:
    """A Dask runner: the scheduler at `address`, else a local cluster of single-threaded workers."""
    address = address or os.environ.get("TACTIC_DASK_ADDRESS")
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs=local_cluster_kwargs(workers))


def local_cluster_kwargs(workers: Optional[int] = None) -> dict:
    """One single-threaded worker per core (or `workers`, `TACTIC_DASK_WORKERS`), in the flow's own
    process: a task only waits on its stage's process, so worker processes bought nothing and cost
    their start on the stages' cores (each imported Prefect, ~5 CPU-seconds). Default profile, 2 cores,
    alternating: 374.6 / 375.6 s with worker processes, 362.5 / 364.8 s in-process."""
    workers = workers or int(os.environ.get("TACTIC_DASK_WORKERS", 0)) or os.cpu_count()
    return {"n_workers": workers, "threads_per_worker": 1, "processes": False, "dashboard_address": None}


@task(name="stage", task_run_name="{name}", retries=0)
def dvc_stage(name: str, root: str, env: dict, fresh: Optional[dict] = None) -> str:
    logger = get_run_logger()
    if fresh is not None and still_fresh(fresh, lock_outs(root)):  # what DVC would skip: no DVC process for it
        # (`fresh_at_start`); the lock is read only for a stage up to date at the start
        logger.info("%s up to date", name)
        return "skipped"
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
    graph = dvc_graph(root)  # DVC's own, for these params: what `dvc repro` would run
    fresh = fresh_at_start(root, graph)
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
                futures[name] = dvc_stage.submit(name, str(root), {**env, "TACTIC_THREADS": threads[name]}, fresh[name],
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


def _show_progress(futures: dict) -> None:
    """A progress artifact in the flow run (stages done of all) until every stage ends or one fails.
    Driven by the Dask futures, which live in this process and say when each ends: a Prefect future's
    `state` asks the API for its task run on every read (61 of them polled every 2 s kept the server
    busy on the stages' cores), and polling at all kept the flow up to 2 s after its last stage."""
    from distributed import as_completed
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    artifact = create_progress_artifact(0.0, key="tactic-progress", description=f"stages done, of {len(futures)}")
    by_id = {id(future.wrapped_future): future for future in futures.values()}
    dask_futures = [future.wrapped_future for future in futures.values()]
    for done, ended in enumerate(as_completed(dask_futures, loop=dask_futures[0].client.loop), 1):
        future = by_id[id(ended)]
        future.wait()  # keeps the final state the task returned: `state` asks nothing more
        update_progress_artifact(artifact, 100.0 * done / len(futures), description=f"{done} of {len(futures)} stages done")
        if not future.state.is_completed():
            return


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
    outlive_the_reader()
    if args.workers:
        os.environ["TACTIC_DASK_WORKERS"] = str(args.workers)
    scheduler = args.dask_address or os.environ.get("TACTIC_DASK_ADDRESS")
    with contextlib.ExitStack() as stack:  # `_start_up` runs while a temporary Prefect server boots (~8 s of one core)
        with shared_api(meanwhile=lambda: _start_up(stack, scheduler, args.workers)) as address:
            try:
                tactic.with_options(task_runner=DaskTaskRunner(address=address))(profile=args.profile)
            finally:
                if scheduler:
                    _drain_workers(address)


async def _drain_prefect() -> None:
    """On a Dask worker: send what Prefect's log and event services still hold, and stop them."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        await service.drain_all(timeout=10)


def _drain_workers(address: str) -> None:
    """Drain Prefect's services on the workers of the cluster at `address` while the flow's API still
    answers. Otherwise a worker stopped after the flow (the flow's temporary API gone with it) spent
    its exit draining them into a server that no longer listens: measured, more than 60 s after
    SIGTERM, where it now exits at once. A new task on the worker starts them again."""
    from distributed import Client

    with contextlib.suppress(Exception), Client(address, timeout=10) as client:  # only exits faster: never fails the flow
        client.run(_drain_prefect)


def _start_up(stack: contextlib.ExitStack, address: Optional[str], workers: Optional[int]) -> str:
    """The rest of the flow's start: the stage server (stages fork from it instead of paying their
    imports, stages/server.py), a local Dask cluster unless `address` names a scheduler (closed by
    `stack`), the MLflow database and the imports of the flow's first steps. Returns the scheduler's address."""
    from stages import server

    server.start(idle=600, wait=0)
    if not address:
        from distributed import LocalCluster

        address = stack.enter_context(LocalCluster(**local_cluster_kwargs(workers))).scheduler_address
    import dvc.repo  # noqa: F401
    import mlflow

    from tactic.tracking import tracking_uri

    mlflow.MlflowClient(tracking_uri()).search_experiments(max_results=1)  # creates the database if new
    return address


@contextlib.contextmanager
def shared_api(meanwhile=lambda: None):
    """One Prefect API for the flow and all its tasks. Without one configured (`PREFECT_API_URL`),
    Prefect starts a temporary server in the flow's process, and every Dask worker process (of a
    cluster at `--dask-address`) would start a temporary server of its own (~10 s each, on the cores
    the stages need) and record its task runs there, out of the flow run's sight. So the temporary server
    is started here (pipeline/server.py `Temporary`), `meanwhile` runs while it boots (what it returns
    is yielded), and it is named in the settings that travel with every task. It listens on
    127.0.0.1: workers on other machines need a real server (`PREFECT_API_URL`)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield meanwhile()
        return
    from pipeline.server import Temporary

    api = Temporary()  # stopped at exit, after Prefect's own exit handlers have sent it their last logs
    result = meanwhile()
    # It took 6.7-15.8 s on 2 cores (benchmarks/orchestration.py prints it): Prefect's own default
    # wait, 20 s, would be too close.
    print(f"temporary Prefect server at {api.url}, started in {api.ready():.1f} s", flush=True)
    with temporary_settings(updates={PREFECT_API_URL: api.url}):
        yield result


if __name__ == "__main__":
    main()
