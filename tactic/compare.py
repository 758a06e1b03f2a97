"""Operating points across seeds, from MLflow: mean and spread of bpp and accuracy per mode and point.

    tactic compare --parent <flow's parent run id> [--csv points.csv]
    tactic compare --runs <run id> <run id> ...
    tactic compare                         # the newest run of every (mode, point, seed) in the experiment
"""
from __future__ import annotations

import argparse
import sys

from tactic import tracking
from tactic.experiment.grid import MODES
from tactic.io import write_text
from tactic.metrics import ALL_TEST_METRICS, TRACKED_NAMES
from tactic.report import aggregate, points_csv, table


def _num(text, cast):
    return None if text in (None, "None", "") else cast(text)


def rows_from_runs(runs) -> list[dict]:
    """Evaluated training runs as report rows; where a (dataset, task, grid, mode, point, seed) was
    trained more than once, the newest run counts."""
    newest = {}
    for r in sorted(runs, key=lambda r: r.info.start_time or 0):
        prm = r.data.params
        # MLflow names the headline score by task (top1, pixel_accuracy); rows call it accuracy.
        met = {**r.data.metrics, **{"accuracy": v for k, v in r.data.metrics.items()
                                    if k == TRACKED_NAMES.get(prm.get("task"), {}).get("accuracy")}}
        if prm.get("mode") not in MODES or "accuracy" not in met:
            continue
        row = {"mode": prm["mode"], "seed": int(prm["seed"]), "beta": _num(prm.get("beta"), float),
               "quality": _num(prm.get("quality"), int), "mlflow_run_id": r.info.run_id,
               "group": (prm.get("dataset"), prm.get("task"), r.data.tags.get("params_hash")),
               **{k: met[k] for k in ALL_TEST_METRICS if k in met}}
        newest[(row["group"], row["mode"], row["beta"], row["quality"], row["seed"])] = row
    return list(newest.values())


def find_runs(parent: str | None = None, run_ids: list[str] | None = None):
    mlflow = tracking.setup()
    client = mlflow.MlflowClient()
    if run_ids:
        return [client.get_run(i) for i in run_ids]
    exp = client.get_experiment_by_name(tracking.EXPERIMENT)
    if exp is None:
        return []
    query = f"tags.mlflow.parentRunId = '{parent}'" if parent else ""
    return client.search_runs([exp.experiment_id], filter_string=query, max_results=50_000)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tactic compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parent", help="a flow's MLflow parent run: compare its nested stage runs")
    ap.add_argument("--runs", nargs="+", help="these MLflow run ids")
    ap.add_argument("--csv", help="also write the points as CSV to this file")
    args = ap.parse_args(argv)
    rows = rows_from_runs(find_runs(args.parent, args.runs))
    if not rows:
        print(f"no evaluated training runs found (tracking URI {tracking.tracking_uri()}); "
              "test metrics are written by the `evaluate` stage", file=sys.stderr)
        return 1
    # Runs of different datasets, tasks or grids (params_hash: the validated params of a run of the
    # grid) are never averaged together: one table each.
    groups = sorted({r["group"] for r in rows}, key=str)
    csv = []
    for group in groups:
        points = aggregate([r for r in rows if r["group"] == group])
        if len(groups) > 1:
            print(f"\n## dataset {group[0]}, task {group[1]}, params {group[2] or '?'}\n")
        print(table(points), end="")
        csv.append(points_csv(points) if not csv else points_csv(points).split("\n", 1)[1])
    if args.csv:
        write_text(args.csv, "".join(csv))
        print(f"wrote {args.csv}")
    return 0
