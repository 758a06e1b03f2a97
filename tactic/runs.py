"""MLflow runs left RUNNING: list them, and end those whose process is gone.

    tactic runs            # every RUNNING run: its stage, process, and whether that process lives
    tactic runs clean      # end each run whose process is gone as KILLED, the reason tagged

Every stage does `clean` itself before it opens its own run (tactic.tracking.start_run), so a run
killed outright (SIGKILL, out of memory) is closed by the next stage; this command is for when no
stage runs next. Runs of other hosts, and runs without the process tags, are listed, never ended.
"""
from __future__ import annotations

import argparse
import os
import socket

from tactic import tracking


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tactic runs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", nargs="?", choices=["list", "clean"], default="list")
    args = ap.parse_args(argv)
    mlflow = tracking.setup()
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(tracking.EXPERIMENT)
    if args.action == "clean":
        closed = tracking.close_orphans(client, exp.experiment_id, f"tactic runs clean (pid {os.getpid()})")
        for r in closed:
            print(f"KILLED {r.info.run_id} {r.data.tags.get('dvc_stage') or r.info.run_name}: {tracking.orphan_reason(r)}")
        print(f"{len(closed)} orphaned run(s) ended")
        return 0
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'", max_results=5000)
    for r in runs:
        tags = r.data.tags
        state = tracking.orphan_reason(r) or (
            "process alive" if tags.get("tactic.host") == socket.gethostname() and tags.get("tactic.process")
            else f"owner unknown (host {tags.get('tactic.host', '?')})")
        print(f"RUNNING {r.info.run_id} {tags.get('dvc_stage') or r.info.run_name}: {state}")
    print(f"{len(runs)} run(s) RUNNING")
    return 0
