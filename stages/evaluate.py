"""Stage `evaluate`: every trained run of the grid on the test split, rates from real bitstreams.

    python -m stages.evaluate [--out results/eval.json]

Writes one row per run (see tactic.experiment.evaluate) and logs the test metrics into each run's own MLflow
run, so the MLflow UI shows loss weights, bpp and accuracy side by side.
"""
from stages.server import handoff

handoff(__name__)  # into a preloaded stage server, when one runs (stages/server.py)

import argparse
from pathlib import Path

from stages import cli
from tactic.experiment.run import evaluate_grid


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data/prepared"))
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--out", type=Path, default=Path("results/eval.json"))
    args, p = cli.parse(ap, argv)
    evaluate_grid(p, args.data, args.models, args.out)


if __name__ == "__main__":
    cli.run(main)
