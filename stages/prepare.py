"""Stage `prepare`: the dataset in `params.yaml:prepare`, as distributed, -> data/prepared.

    python -m stages.prepare [--params params.yaml] [--out data/prepared]
"""
from stages.server import handoff

handoff(__name__)  # into a preloaded stage server, when one runs (stages/server.py)

import argparse
from pathlib import Path

from stages import cli
from tactic.data.prepare import prepare_tracked


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("data/prepared"))
    args, p = cli.parse(ap, argv)
    meta = prepare_tracked(p.prepare, args.out)
    print(f"prepared {meta['dataset']}: {meta['counts']} -> {args.out}")
    if meta["skipped"]:
        print(f"skipped {meta['skipped']} unreadable images: listed in {args.out / 'skipped.json'}")
    if meta["stray"]:
        print(f"left out {meta['stray']} files that are not images: listed in {args.out / 'skipped.json'}")


if __name__ == "__main__":
    cli.run(main)
