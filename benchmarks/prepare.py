"""`prepare` throughput and memory: parallel streaming decode against a single-process Pillow loop.

    python benchmarks/prepare.py [--images 1200] [--source-size 256] [--size 128] [--workers N]

Generates RESISC-45-layout JPEG files (seeded), then in one run:
1. images/s of `prepare` (worker processes, rows streamed to .npy) against a plain loop in one
   process that decodes and resizes the same files with the same function and stacks them in memory;
   goal: ratio >= 1.8 on 2 cores. For scale, the same loop split over independent processes with
   nothing shared (the machine's ceiling for this work: SIMD-heavy decoding scales worse than
   plain Python on vCPUs that share a physical core).
2. peak memory (max RSS of a fresh process running `prepare`) at the full image count and at a
   quarter of it: streaming means the peak does not grow with the dataset.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tactic.config import PrepareParams
from tactic.data import fixtures
from tactic.data.images import load_image
from tactic.data.prepare import prepare

# VmHWM, not ru_maxrss, for the process itself: ru_maxrss survives exec, so it would report the
# memory of this benchmark at the moment it started the subprocess.
PEAK = """
import re, resource, sys
from pathlib import Path
from tactic.config import PrepareParams
from tactic.data.prepare import prepare
prepare(PrepareParams.model_validate_json(sys.argv[1]), sys.argv[2])
own = int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(own, kids)
"""


def peak_rss_mb(cfg: PrepareParams, out: Path) -> tuple[float, float]:
    """(parent, largest worker) peak resident memory in MiB of a fresh process running `prepare`."""
    res = subprocess.run([sys.executable, "-c", PEAK, cfg.model_dump_json(), str(out)], capture_output=True, text=True, check=True)
    own, kids = map(int, res.stdout.split()[-2:])
    return own / 1024, kids / 1024


def _loop(files, size):
    return len([load_image(f, size, 3) for f in files])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--source-size", type=int, default=256, help="side of the generated JPEGs (RESISC-45: 256)")
    ap.add_argument("--size", type=int, default=128, help="prepare.size")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        classes = 3
        root = fixtures.resisc(tmp / "raw", classes=classes, per_class=args.images // classes,
                               size=(args.source_size, args.source_size))
        files = sorted(root.rglob("*.jpg"))
        cfg = PrepareParams(dataset="resisc-45", root=str(root), size=args.size, classes=classes, workers=args.workers)

        t0 = time.perf_counter()
        stacked = np.stack([load_image(f, args.size, 3) for f in files])
        t_loop = time.perf_counter() - t0
        t0 = time.perf_counter()
        prepare(cfg, tmp / "prepared")
        t_prep = time.perf_counter() - t0
        with multiprocessing.get_context("fork").Pool(args.workers) as pool:
            t0 = time.perf_counter()
            pool.starmap(_loop, [(files[i::args.workers], args.size) for i in range(args.workers)])
            t_split = time.perf_counter() - t0
        n = len(files)
        print(f"{n} JPEGs {args.source_size}px -> {args.size}px, {args.workers} workers")
        print(f"decode+resize  single-process loop {n / t_loop:7.0f} img/s   prepare {n / t_prep:7.0f} img/s   "
              f"ratio {t_loop / t_prep:.2f}   (independent processes, nothing written: ratio {t_loop / t_split:.2f})")
        del stacked

        small = cfg.model_copy(update={"classes": 1})  # a third of the images
        (p_small, w_small), (p_full, w_full) = peak_rss_mb(small, tmp / "p1"), peak_rss_mb(cfg, tmp / "p2")
        data_mb = n * args.size * args.size * 3 / 2**20
        print(f"peak RSS  {n // classes} images: parent {p_small:.0f} MiB, worker {w_small:.0f} MiB   "
              f"{n} images: parent {p_full:.0f} MiB, worker {w_full:.0f} MiB   (prepared data {data_mb:.0f} MiB)")


if __name__ == "__main__":
    main()
