"""Making the embedded segmentation set (tactic.data.canvases): `make_canvases` against writing the
same number of bytes, in the same run (a ratio, not an absolute time).

    python benchmarks/canvases.py [--count 3000] [--repeats 5]

The baseline fills arrays of the canvases' and masks' shapes with random bytes: the memory traffic
any canvas maker pays. `make_canvases` places 2-4 Fashion-MNIST items per 64x64 canvas with masks,
vectorised over all canvases; it is what `prepare` runs for `fashion-mnist-canvases`.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from tactic.data import fashion_mnist
from tactic.data.canvases import make_canvases


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    args = ap.parse_args(argv)
    images, labels = fashion_mnist.load(args.root, "test")
    canvases, masks = make_canvases(images[:500], labels[:500], args.count, seed=0)
    rng = np.random.default_rng(0)
    fill = best(lambda: (rng.integers(0, 256, canvases.shape, np.uint8), rng.integers(0, 11, masks.shape, np.uint8)),
                args.repeats)
    make = best(lambda: make_canvases(images[:500], labels[:500], args.count, seed=0), args.repeats)
    print(f"{args.count} canvases {canvases.shape[1]}x{canvases.shape[2]}: make_canvases {make:.3f} s "
          f"({args.count / make:,.0f}/s); random fill of the same arrays {fill:.3f} s; ratio {make / fill:.2f}")


if __name__ == "__main__":
    main()
