"""Stage `pretrain_hyperprior@<quality>-<seed>`: the bmshj2018 scale-hyperprior codec at one quality,
rate-distortion trained on the prepared data (CompressAI's loss and lambda), for the compressed-domain modes.

    python -m stages.pretrain_hyperprior --quality 4 --seed 0
"""
from stages.server import handoff

handoff(__name__)  # into a preloaded stage server, when one runs (stages/server.py)

import argparse
from pathlib import Path

from stages import cli
from tactic.experiment.run import pretrain_hyperprior
from tactic.experiment.grid import Run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--data", type=Path, default=Path("data/prepared"))
    ap.add_argument("--models", type=Path, default=Path("models"))
    args, p = cli.parse(ap, argv)
    last = pretrain_hyperprior(p, Run("pretrain-hyperprior", args.seed, quality=args.quality), args.data, args.models)
    print(f"pretrain_hyperprior quality={args.quality} seed={args.seed}: val bpp~{last['val_bpp_loss']:.3f} "
          f"psnr {last['val_psnr']:.2f} dB")


if __name__ == "__main__":
    cli.run(main)
