"""Stage `train_<mode>@...`: the task network in one mode at one operating point and seed.

    python -m stages.train uncompressed --seed 0
    python -m stages.train jpeg --quality 10 --seed 0
    python -m stages.train agnostic --beta 0.004 --seed 0    # needs pretrain@0.004-0
    python -m stages.train aware --beta 0.004 --seed 0       # needs pretrain@0.004-0
    python -m stages.train latent-frozen --quality 4 --seed 0  # needs pretrain_hyperprior@4-0 (also
                                                               # latent-joint, pixel-decoded)
"""
from stages.server import handoff

handoff(__name__)  # into a preloaded stage server, when one runs (stages/server.py)

import argparse
from pathlib import Path

from stages import cli
from tactic.experiment.run import train_task
from tactic.experiment.grid import MODES, Run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=MODES)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--beta", type=float)
    ap.add_argument("--quality", type=int)
    ap.add_argument("--data", type=Path, default=Path("data/prepared"))
    ap.add_argument("--models", type=Path, default=Path("models"))
    args, p = cli.parse(ap, argv)
    try:
        run = Run.of(args.mode, args.seed, beta=args.beta, quality=args.quality)
    except ValueError as err:
        ap.error(str(err))
    last = train_task(p, run, args.data, args.models)
    print(f"{run.key}: val accuracy {last['val_accuracy']:.4f}")


if __name__ == "__main__":
    cli.run(main)
