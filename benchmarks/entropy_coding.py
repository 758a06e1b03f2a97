"""Entropy coding one image at a time: CompressAI's entropy models against tactic.codecs.entropy's.

    python benchmarks/entropy_coding.py [--images 768] [--batch 256] [--repeats 3]

For each codec the project writes per-image bitstreams with (the TACTIC codec on 28x28 grey images,
the default profile's; the bmshj2018 hyperprior at (N, M) = (32, 48) and at CompressAI's (128, 192)
on 64x64 grey images, the latent profile's and the paper's), the same images are encoded to
bitstreams and decoded back to latents, best of `--repeats`, with the entropy models as CompressAI's
classes (what the project used before: the whole CDF table sent to the coder as new Python lists
for every image) and as tactic.codecs.entropy's, the sides in turn. Prints images/s of each and the
ratio, and checks that both wrote the same bytes. The hyperprior's networks are untrained (their
latents nearly all zero): the coder's table cost, which is what differs, does not depend on the values.

The TACTIC codec's streams come from tactic.codecs.rangecoder (`FactorizedPrior`), not rANS: for it a
third side, "range", is timed the same way, its decoded latents checked equal to rANS's, and the
bytes an image of rANS and of the range coder printed beside the entropy model's estimate (the sum of
-log2 likelihoods of the rounded latents). So that there is something to code, its encoder's last
convolution is scaled to spread the latents over a few integers and its prior fitted to them
(`--fit-steps` Adam steps on their likelihood) before timing.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from tactic.codecs import entropy  # before compressai: it skips compressai's point-cloud imports
from compressai import entropy_models as cai
from tactic.codecs.codec import TacticCodec
from tactic.codecs.hyperprior import Hyperprior, decode_latents, encode


def smooth_images(n: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return F.interpolate(torch.rand(n, 1, size // 4, size // 4, generator=g), size=(size, size), mode="bilinear")


def fit_prior(codec: TacticCodec, x: torch.Tensor, steps: int) -> None:
    """Latents spread over a few integers (the untrained ones are within +-0.4) and the prior fitted to them."""
    last = [m for m in codec.g_a if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.mul_(16), last.bias.mul_(16)
        y = codec.g_a(x)
    eb = codec.entropy_bottleneck
    opt = torch.optim.Adam(eb.parameters(), lr=0.01)
    for _ in range(steps):
        _, likelihoods = eb(y)
        loss = -likelihoods.log2().sum() / len(y) + eb.loss()
        opt.zero_grad(), loss.backward(), opt.step()


@torch.no_grad()
def estimated_bytes(codec: TacticCodec, x: torch.Tensor) -> float:
    """The entropy model's estimate, bytes an image: -log2 likelihoods of the rounded latents."""
    return -codec.eval()(x)["likelihoods"]["y"].log2().sum().item() / 8 / len(x)


def as_classes(codec, eb, gc=None) -> None:
    codec.entropy_bottleneck.__class__ = eb
    if gc is not None:
        codec.gaussian_conditional.__class__ = gc


@torch.no_grad()
def round_trip(codec, x: torch.Tensor, batch: int) -> tuple[float, float, list, list]:
    """(encode s, decode s, the streams, the decoded latents) over `x` in batches."""
    enc = dec = 0.0
    streams, latents = [], []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        t = time.perf_counter()
        if isinstance(codec, Hyperprior):
            packed = encode(codec, xb)
            t1 = time.perf_counter()
            decoded = decode_latents(codec, packed["streams"], packed["shape"], [f"image {j}" for j in range(len(xb))])
            streams += packed["streams"]
        else:
            out = codec.compress(xb)
            t1 = time.perf_counter()
            decoded = codec.entropy_bottleneck.decompress(out["strings"][0], out["shape"])
            streams += out["strings"][0]
        enc, dec = enc + t1 - t, dec + time.perf_counter() - t1
        latents.append(decoded)
    return enc, dec, streams, latents


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)  # evaluate.batch_size
    ap.add_argument("--fit-steps", type=int, default=300)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    codecs = {"tactic (16, 8), 28 px": (TacticCodec(1, 16, 8), 28),
              "hyperprior q1 (32, 48), 64 px": (Hyperprior(1, 1, 32, 48), 64),
              "hyperprior q1 (128, 192), 64 px": (Hyperprior(1, 1), 64)}
    print(f"{args.images} images, batches of {args.batch}, best of {args.repeats}; images/s (encode | decode)")
    for name, (codec, size) in codecs.items():
        x = smooth_images(args.images, size)
        hyper = isinstance(codec, Hyperprior)
        if not hyper:
            fit_prior(codec, x, args.fit_steps)
        codec.eval().update(force=True)
        sides = {"compressai": (cai.EntropyBottleneck, cai.GaussianConditional if hyper else None),
                 "tactic": (entropy.EntropyBottleneck, entropy.GaussianConditional if hyper else None)}
        if not hyper:
            sides["range"] = (entropy.FactorizedPrior,)
        best, streams, latents = {}, {}, {}
        for _ in range(args.repeats):
            for side, classes in sides.items():
                as_classes(codec, *classes)
                enc, dec, streams[side], latents[side] = round_trip(codec, x, args.batch)
                old = best.get(side, (float("inf"), float("inf")))
                best[side] = (min(old[0], enc), min(old[1], dec))
        same = streams["compressai"] == streams["tactic"]
        (e0, d0), (e1, d1) = best["compressai"], best["tactic"]
        n = args.images
        print(f"{name}: compressai {n / e0:,.0f} | {n / d0:,.0f}, tactic {n / e1:,.0f} | {n / d1:,.0f}; "
              f"ratio {e0 / e1:.2f}x | {d0 / d1:.2f}x (round trip {(e0 + d0) / (e1 + d1):.2f}x); "
              f"same bytes: {'yes' if same else 'NO'}")
        if not same:
            raise SystemExit(f"{name}: the two coders wrote different bytes")
        if "range" in best:
            (e2, d2), size_of = best["range"], lambda side: sum(map(len, streams[side])) / n
            same = all(torch.equal(a, b) for a, b in zip(latents["tactic"], latents["range"]))
            print(f"{name}, range coder: {n / e2:,.0f} | {n / d2:,.0f} images/s, {e1 / e2:.2f}x | {d1 / d2:.2f}x "
                  f"rANS's; bytes an image: estimate {estimated_bytes(codec, x):.2f}, rANS {size_of('tactic'):.2f}, "
                  f"range {size_of('range'):.2f}; same latents: {'yes' if same else 'NO'}")
            if not same:
                raise SystemExit(f"{name}: the range coder decoded other latents than rANS")


if __name__ == "__main__":
    main()
