"""Stage `evaluate`: every trained run of the grid on the test split, rates from real bitstreams.

    python -m stages.evaluate [--out results/eval.json]

Writes one row per run (see tactic.evaluate) and logs the test metrics into each run's own MLflow
run, so the MLflow UI shows loss weights, bpp and accuracy side by side.
"""
from stages.server import handoff

handoff(__name__)  # into a preloaded stage server, when one runs (stages/server.py)

import argparse
import sys
import time
from pathlib import Path

from stages import cli
from tactic import tracking
from tactic.experiment import evaluate_run
from tactic.grid import task_runs
from tactic.io import write_json
from tactic.system import resolve_device

TEST_METRICS = ("accuracy", "top5", "miou", "bpp", "bpp_estimated", "bpp_file", "psnr")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data/prepared"))
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--out", type=Path, default=Path("results/eval.json"))
    args, p = cli.parse(ap, argv)
    device = resolve_device(p)
    runs = task_runs(p)
    with tracking.start_run("evaluate", "evaluate", {"stage": "evaluate", "num_runs": len(runs), **p.evaluate.model_dump()}):
        client = tracking.setup().MlflowClient()
        rows, t0 = [], time.perf_counter()
        for i, run in enumerate(runs):
            row = evaluate_run(p, run, args.data, args.models, device)
            rows.append(row)
            print(f"[{i + 1}/{len(runs)}] {run.key}: accuracy {row.get('accuracy', float('nan')):.4f} bpp {row['bpp']:.4f}", file=sys.stderr)
            if row.get("mlflow_run_id"):
                for k in TEST_METRICS:
                    if row.get(k) is not None:
                        client.log_metric(row["mlflow_run_id"], k, row[k])
        # Time inside the evaluation loop, as training logs train_seconds (benchmarks/stage_overhead.py).
        tracking.log_metrics({"eval_seconds": time.perf_counter() - t0})
        write_json(args.out, rows)
        tracking.log_artifact(args.out)


if __name__ == "__main__":
    cli.run(main)
