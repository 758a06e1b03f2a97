"""A training step in NHWC (channels_last) against NCHW, as ratios in one run: the figures behind
`fit`'s choice of layout (tactic.experiment.train.use_nhwc: NHWC for networks of at most 64 channels).

    python benchmarks/train_step.py [--threads 2] [--steps 30] [--repeats 3]

For each network the shipped profiles train (the default's codec and small CNN, as `pretrain`,
`aware` and `uncompressed` put them together: `agnostic`, JPEG and the frozen latent modes train their
task network alone, on cached codes, as `uncompressed` does; the latent profile's hyperprior,
cResNet-39 on its 4x4 latents and ResNet-50 on 64x64 pixels): forward, loss, backward and the Adam
steps of one batch, the two layouts interleaved, best of `--repeats`. Random inputs of the profiles'
shapes: the arithmetic of a step does not depend on the values.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.throughput import bare_loop  # noqa: E402
from tactic.codecs.codec import TacticCodec
from tactic.codecs.hyperprior import Hyperprior
from tactic.config import load_params
from tactic.experiment.system import System
from tactic.experiment.train import channels_last, make_optimizers, use_nhwc
from tactic.losses import TacticLoss
from tactic.tasks.classifiers import build_classifier
from tactic.tasks.cresnet import CResNet39, LatentHead


def systems(p) -> dict:
    """{name: (make_system, loss, input shape)} for the default and latent profiles' networks."""
    c, t, b = p.model.codec, p.model.task, p.train.batch_size
    codec = lambda: TacticCodec(1, c.N, c.M, c.quantizer, c.latent_relu)  # noqa: E731
    small = lambda: build_classifier(t.arch, 1, 10, t.width)  # noqa: E731
    tactic_loss = lambda task: TacticLoss(p.train.lmbda_d, p.train.alpha if task else 0.0, 0.4)  # noqa: E731
    return {
        "pretrain (codec)": (lambda: System(codec()), tactic_loss(False), (b, 1, 28, 28)),
        "aware (codec + small CNN)": (lambda: System(codec(), small()), tactic_loss(True), (b, 1, 28, 28)),
        "uncompressed (small CNN)": (lambda: System(None, small()), TacticLoss(0.0, 1.0, 0.0), (b, 1, 28, 28)),
        "latent: hyperprior q4 (32, 48)": (lambda: System(Hyperprior(4, 1, 32, 48)), TacticLoss(0.013 * 255**2, 0.0, 1.0),
                                           (16, 1, 64, 64)),
        "latent: cResNet-39 on 4x4": (lambda: System(None, LatentHead(CResNet39(48, 10))), TacticLoss(0.0, 1.0, 0.0),
                                      (16, 96, 4, 4)),
        "latent: ResNet-50 on 64x64": (lambda: System(None, build_classifier("resnet50", 1, 10)), TacticLoss(0.0, 1.0, 0.0),
                                       (16, 1, 64, 64)),
    }


def step_ms(make, loss_fn, shape, nhwc: bool, steps: int) -> float:
    """Milliseconds a step of throughput.py's bare training loop takes on one batch of `shape`."""
    torch.manual_seed(0)
    system = make()
    optim = make_optimizers(system, 1e-3)
    x, y = torch.rand(shape), torch.randint(0, 10, (shape[0],))
    if nhwc:
        system.to(memory_format=torch.channels_last)
        x = channels_last(x)
    bare_loop(system, loss_fn, optim, [x] * 3, [y] * 3)  # oneDNN picks and caches its kernels in the first steps
    return bare_loop(system, loss_fn, optim, [x] * steps, [y] * steps) / steps * 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    p = load_params(ROOT / "params.yaml")
    best = {}
    for _ in range(args.repeats):
        for name, (make, loss_fn, shape) in systems(p).items():
            for nhwc in (False, True):
                ms = step_ms(make, loss_fn, shape, nhwc, args.steps)
                best[name, nhwc] = min(best.get((name, nhwc), ms), ms)
    print(f"training step, {args.threads} torch threads, best of {args.repeats} x {args.steps} steps")
    print("| network | NCHW ms | NHWC ms | speed-up | fit uses |\n|---|---|---|---|---|")
    for name, (make, _, _) in systems(p).items():
        a, b = best[name, False], best[name, True]
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {'NHWC' if use_nhwc(make()) else 'NCHW'} |")


if __name__ == "__main__":
    main()
