"""Register and serve the deployment `tactic/full`; runs triggered from the CLI or UI execute here.

    python -m pipeline.server start          # a local Prefect server, detached; UI at http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m pipeline.serve [--workers N | --dask-address tcp://scheduler:8786]
    prefect deployment run tactic/full --param profile=smoke --watch
"""
import argparse
import os

from pipeline.flow import tactic
from pipeline.stages import outlive_the_reader
from stages import server


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, help="local Dask workers (default: one per core)")
    ap.add_argument("--dask-address", help="an existing Dask scheduler; the grid then runs on its workers")
    args = ap.parse_args(argv)
    outlive_the_reader()  # its flow runs write to the same output (pipeline/stages.py)
    # Each flow run executes in a fresh process that imports pipeline.flow, whose task runner is
    # built from these variables: the environment is how the choice reaches it.
    if args.workers:
        os.environ["TACTIC_DASK_WORKERS"] = str(args.workers)
    if args.dask_address:
        os.environ["TACTIC_DASK_ADDRESS"] = args.dask_address
    # Stages run by local workers fork from the stage server instead of paying ~8 s of imports each.
    server.start(idle=600, wait=0)
    from prefect.settings import PREFECT_RUNNER_POLL_FREQUENCY, temporary_settings

    # How often the runner asks the API for runs to start: Prefect's 10 s default is up to 10 s of
    # waiting before each run; one local query a second costs nothing beside the stages. A value
    # set in the environment is kept.
    poll = {} if "PREFECT_RUNNER_POLL_FREQUENCY" in os.environ else {PREFECT_RUNNER_POLL_FREQUENCY: 1}
    with temporary_settings(updates=poll):
        tactic.serve(name="full", description="The whole TACTIC pipeline: every DVC stage that is not up to date.")


if __name__ == "__main__":
    main()
