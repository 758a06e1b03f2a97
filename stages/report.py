"""Stage `report`: results/eval.json -> table, rate-accuracy plot, CompressAI-format JSON, BD-accuracy.

    python -m stages.report [--eval results/eval.json] [--out results]
"""
from stages.server import handoff

handoff(__name__)  # into a preloaded stage server, when one runs (stages/server.py)

import argparse
from pathlib import Path

from stages import cli
from tactic.report import report_tracked


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval", type=Path, default=Path("results/eval.json"))
    ap.add_argument("--out", type=Path, default=Path("results"))
    args, p = cli.parse(ap, argv)
    report_tracked(args.eval, args.out, p.report.title, p.prepare.dataset)
    print((args.out / "table.md").read_text())
    print((args.out / "summary.md").read_text())  # every figure of summary.json, with its spread and notes
    print(f"plot: {(args.out / 'rate_accuracy.png').resolve()}")


if __name__ == "__main__":
    cli.run(main)
