"""Throughput benchmarks, each against a baseline measured in the same run (ratios, not absolute times).

    python benchmarks/throughput.py [--images 4000] [--repeats 3]

1. Training: the project's loop (`tactic.experiment.train.fit`: memory-mapped batches, loss parts, the auxiliary
   quantile optimiser, progress bar, per-epoch validation and checkpoint) against a bare PyTorch loop
   over the same model and the same batches already in memory. Goal: ratio >= 0.9.
2. Coding: the TACTIC codec's real entropy coding (compress + decompress, batched) against Pillow
   JPEG (encode + decode, one image at a time, as the pipeline uses it) on the same test images.

Prints images/s per side and the ratio, best of `--repeats`, for the embedded default profile.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tactic.codecs import jpeg
from tactic.config import load_params
from tactic.data import batches, to_float
from tactic.data.prepare import prepare
from tactic.data.prepared import Split, load_split, read_meta
from tactic.losses import TacticLoss
from tactic.experiment.system import System, build_codec, build_task, resolve_device
from tactic.experiment.train import channels_last, fit, make_optimizers, use_nhwc


def _system(p, meta, mode):
    codec = build_codec(p, meta["channels"]) if mode == "aware" else None
    return System(codec, build_task(p, meta))


def bare_loop(system, loss_fn, optim, xs, ys):
    """Seconds for one plain training step per batch (in the layout of `system` and `xs`)."""
    opt, aux = optim
    system.train()
    t0 = time.perf_counter()
    for x, y in zip(xs, ys):
        loss = loss_fn(system(x), x, y)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if aux is not None:
            aux.zero_grad(set_to_none=True)
            system.codec.aux_loss().backward()
            aux.step()
    return time.perf_counter() - t0


def project_loop(system, loss_fn, optim, train, val, cfg, device, ckpt):
    t0 = time.perf_counter()
    fit(system, loss_fn, optim, train, val, cfg, 0, device, ckpt, "bench")
    return time.perf_counter() - t0


def bench_training(p, data, device, n, repeats):
    meta = read_meta(data)
    full = load_split(data, "train")
    train = Split(full.images[:n], full.labels[:n])
    val = load_split(data, "val")
    val = Split(val.images[:p.train.batch_size], val.labels[:p.train.batch_size])
    cfg = p.train.model_copy(update={"epochs": 1})
    # The bare loop gets the project's exact batches, materialised in memory beforehand.
    pairs = list(batches(train, cfg.batch_size, device, shuffle_seed=0))
    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    for mode in ("uncompressed", "aware"):
        loss_fn = TacticLoss(1.0, p.train.alpha, 0.004) if mode == "aware" else TacticLoss(0.0, 1.0, 0.0)
        best = {"bare": float("inf"), "project": float("inf")}
        for r in range(repeats):
            for side in ("bare", "project"):  # alternate, so drift in machine load hits both
                torch.manual_seed(r)
                system = _system(p, meta, mode).to(device)
                optim = make_optimizers(system, cfg.lr, codec_lr=cfg.codec_lr, aux_lr=cfg.aux_lr)
                with tempfile.TemporaryDirectory() as tmp:
                    nhwc = side == "bare" and use_nhwc(system)  # fit's memory layout: only the loops are compared
                    if nhwc:
                        system.to(memory_format=torch.channels_last)
                    t = bare_loop(system, loss_fn, optim, [channels_last(x) for x in xs] if nhwc else xs, ys) if side == "bare" else \
                        project_loop(system, loss_fn, optim, train, val, cfg, device, Path(tmp) / "ckpt.pt")
                best[side] = min(best[side], t)
        bare, proj = n / best["bare"], n / best["project"]
        print(f"train {mode:<13} bare loop {bare:8.0f} img/s   project loop {proj:8.0f} img/s   ratio {proj / bare:.2f}")


@torch.no_grad()
def bench_coding(p, data, device, n, repeats, quality=10):
    meta = read_meta(data)
    test = load_split(data, "test")
    images = np.asarray(test.images[:n])
    codec = build_codec(p, meta["channels"]).to(device).eval()
    codec.update(force=True)
    x = to_float(images, device)
    best_codec = best_jpeg = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, n, 256):
            enc = codec.compress(x[i:i + 256])
            codec.decompress(enc["strings"], enc["shape"])
        best_codec = min(best_codec, time.perf_counter() - t0)
        t0 = time.perf_counter()
        jpeg.roundtrip(images, quality)
        best_jpeg = min(best_jpeg, time.perf_counter() - t0)
    print(f"coding (encode+decode)  TACTIC codec {n / best_codec:8.0f} img/s   Pillow JPEG q{quality} {n / best_jpeg:8.0f} img/s   "
          f"ratio codec/JPEG {best_jpeg / best_codec:.2f}   (untrained weights: speed only)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    p = load_params()
    device = resolve_device(p)
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {p.train.batch_size}, {args.images} images")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "prepared"
        prepare(p.prepare.model_copy(update={"train_size": max(args.images, 100), "test_size": min(args.images, 10000)}), data)
        bench_training(p, data, device, args.images, args.repeats)
        bench_coding(p, data, device, min(args.images, 10000), args.repeats)


if __name__ == "__main__":
    main()
