"""Stage `pretrain@<beta>-<seed>`: the codec trained for rate-distortion alone (alpha = 0).

    python -m stages.pretrain --beta 0.004 --seed 0
"""
from stages.server import handoff

handoff(__name__)  # into a preloaded stage server, when one runs (stages/server.py)

import argparse
from pathlib import Path

from stages import cli
from tactic.experiment.run import pretrain_codec
from tactic.experiment.grid import Run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--beta", type=float, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--data", type=Path, default=Path("data/prepared"))
    ap.add_argument("--models", type=Path, default=Path("models"))
    args, p = cli.parse(ap, argv)
    last = pretrain_codec(p, Run("pretrain", args.seed, beta=args.beta), args.data, args.models)
    print(f"pretrain beta={args.beta} seed={args.seed}: val bpp~{last['val_bpp_loss']:.3f} psnr {last['val_psnr']:.2f} dB")


if __name__ == "__main__":
    cli.run(main)
