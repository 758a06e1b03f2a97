"""Inference from bitstreams: the compressed domain against decoding to pixels, on the same streams.

    python benchmarks/latent_inference.py [--quality 1] [--images 32] [--size 64] [--batch 16]
                                          [--repeats 5] [--device cpu] [--prepared data/prepared]
                                          [--codec CHECKPOINT]

Encodes the images once (bmshj2018-hyperprior, framed streams as `tactic.codecs.hyperprior.encode`
writes them), then times over the same streams (per batch the best of `--repeats`, sides in turn):

    (a) compressed domain: entropy decode (z, then y)  + cResNet-39 on (y_hat, sigma_hat)
    (b) pixel domain:      entropy decode (z, then y)  + pixel decoder g_s + ResNet-50 on x_hat

and prints images/s of both, the ratio a/b (the decoding cost the compressed domain saves), the
entropy decoding alone, which both share, and the networks' GFLOP per image (counted, so free of
the noise that other load puts on a shared machine's timings). Without `--codec` the networks are
untrained: the timings are real, the predictions are not, and the latents are nearly all zero, so
entropy decoding is somewhat cheaper than with a trained codec (the same for both sides).
`--prepared` reads the prepared test split (grey images are repeated to RGB and zero-padded to a
multiple of 64, as the zoo codecs are RGB); otherwise the images are smooth random ones.
The default run takes about 20 s on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from tactic.tasks.cresnet import CResNet39
from tactic.codecs.hyperprior import Hyperprior, decode_latents, decode_pixels, encode, load_hyperprior, pad


def images(n: int, size: int, prepared: str | None) -> tuple[torch.Tensor, int]:
    """(N, 3, H, W) images ready to code and the pixels per image before padding (bpp counts those)."""
    if prepared:
        from tactic.data import to_float
        from tactic.data.prepared import load_split

        x = to_float(load_split(prepared, "test").images[:n], "cpu")
        return pad(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x), x.shape[2] * x.shape[3]
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(n, 3, max(size // 8, 1), max(size // 8, 1), generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False), size * size


def build(args, device):
    codec = load_hyperprior(args.codec, args.quality) if args.codec else Hyperprior(args.quality)
    codec.update(force=True)
    cresnet = CResNet39(codec.M, args.classes)
    import torchvision.models as tvm

    resnet = tvm.resnet50(weights=None, num_classes=args.classes)
    return [m.to(device).eval() for m in (codec, cresnet, resnet)]


def encode_batches(codec, x: torch.Tensor, batch: int, device) -> list:
    out = []
    for i in range(0, len(x), batch):
        packed = encode(codec, x[i:i + batch].to(device))
        names = [f"image_{j:05d}" for j in range(i, i + len(packed["streams"]))]
        out.append((packed["streams"], packed["shape"], names))
    return out


def gflop_per_image(fn, *args) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    # no_grad, not inference_mode: the counter's module tracker hooks fail on GDN under inference_mode.
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops() / 1e9 / len(args[0])


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def best_times(fns: dict, batches, repeats: int, device) -> dict:
    """Seconds per pass over all batches for each function: per batch the best of `repeats`, summed.

    The functions take turns on each batch, and each batch keeps its own best, so a burst of
    other load on a shared machine spoils one sample, not one side of the ratio.
    """
    for fn in fns.values():
        fn(*batches[0])  # warm-up: allocator, kernel selection
    best = {key: [float("inf")] * len(batches) for key in fns}
    for _ in range(repeats):
        for i, b in enumerate(batches):
            for key, fn in fns.items():
                sync(device)
                t0 = time.perf_counter()
                fn(*b)
                sync(device)
                best[key][i] = min(best[key][i], time.perf_counter() - t0)
    return {key: sum(times) for key, times in best.items()}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quality", type=int, default=1)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, default=64, help="image side, a multiple of 64 (random images)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prepared", default=None, help="prepared data folder; its test split is used")
    ap.add_argument("--codec", default=None, help="codec checkpoint (ours or a CompressAI state dict)")
    return ap.parse_args(argv)


def run(args) -> dict:
    """Images/s of entropy decoding, (a) and (b), GFLOP per image of each side's networks, framed bpp."""
    device = torch.device(args.device)
    codec, cresnet, resnet = build(args, device)
    x, pixels_per_image = images(args.images, args.size, args.prepared)
    batches = encode_batches(codec, x, args.batch, device)
    n = sum(len(b[0]) for b in batches)

    def entropy(streams, shape, names):
        decode_latents(codec, streams, shape, names)

    def compressed(streams, shape, names):
        lat = decode_latents(codec, streams, shape, names)
        cresnet(lat["y_hat"], lat["sigma_hat"])

    def pixels(streams, shape, names):
        resnet(decode_pixels(codec, streams, shape, names)["x_hat"])

    t = best_times({"entropy": entropy, "a": compressed, "b": pixels}, batches, args.repeats, device)
    lat = {k: v.clone() for k, v in decode_latents(codec, *batches[0]).items()}
    return {
        "images": n, "shape": tuple(x.shape[1:]),
        "bpp": 8 * sum(len(s) for b in batches for s in b[0]) / (n * pixels_per_image),
        "ips": {k: n / v for k, v in t.items()}, "speedup": t["b"] / t["a"],
        "gflop_a": gflop_per_image(cresnet, lat["y_hat"], lat["sigma_hat"]),
        "gflop_b": gflop_per_image(lambda y: resnet(codec.g_s(y)), lat["y_hat"]),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    r = run(args)
    weights = f"codec {args.codec}" if args.codec else "untrained weights (speed only)"
    print(f"bmshj2018-hyperprior quality {args.quality}, {r['images']} images {r['shape']}, batch {args.batch}, "
          f"{args.device}, {torch.get_num_threads()} threads, {weights}, {r['bpp']:.3f} bpp framed")
    ips = r["ips"]
    print(f"  entropy decode only                  {ips['entropy']:9.1f} images/s")
    print(f"  (a) entropy decode + cResNet-39      {ips['a']:9.1f} images/s   cResNet-39 {r['gflop_a']:.3f} GFLOP/image")
    print(f"  (b) entropy decode + g_s + ResNet-50 {ips['b']:9.1f} images/s   g_s + ResNet-50 {r['gflop_b']:.3f} GFLOP/image")
    print(f"  ratio a/b: {r['speedup']:.2f}x  (compressed-domain speed-up; per batch best of {args.repeats})")


if __name__ == "__main__":
    main()
