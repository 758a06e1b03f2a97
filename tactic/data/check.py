"""Check a dataset before a long run: its layout, classes, images and splits, and that every image
(and label mask) decodes. Nothing is written.

    tactic datasets check rsscn7 /data/RSSCN7            # prepare params from params.yaml, these two replaced
    tactic datasets check imagenet-50 /data/imagenet/train --params params.yaml --workers 8

Exit status: 0 when the layout matches and every image decodes; 1 when some images do not (each
listed with its path and reason) or the layout itself is wrong (the message names the expected
layout and the first path off it); 2 for usage errors.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path


from tactic.config import DEFAULT_PARAMS, PrepareParams, load_params
from tactic.data.images import Bad, load_pair
from tactic.data.layouts import index as index_dataset, label_lut
from tactic.data.prepare import choose_splits
from tactic.errors import TacticError


def _decode(task):
    item, target, channels, lut = task
    image, _ = load_pair(item, None, channels, target, lut)
    return image if isinstance(image, Bad) else None


def check(cfg: PrepareParams, workers: int | None = None) -> dict:
    """{dataset, classes, images, splits, unreadable: [{path, reason}], stray: [path]}; raises the
    layout's DatasetError (a TacticError) when the layout does not match."""
    ix = index_dataset(cfg)
    splits = choose_splits(ix, cfg)
    lut = label_lut(ix.dataset)  # every image of the layout is decoded, not only those the splits take
    tasks = ((ix.images[i], ix.targets[i], ix.channels, lut) for i in range(len(ix.images)))
    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(ix.images) >= 64:
        ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        with ctx.Pool(workers) as pool:
            results = list(pool.imap_unordered(_decode, tasks, chunksize=32))
    else:
        results = [_decode(t) for t in tasks]
    bad = sorted(({"path": r.path, "reason": r.reason} for r in results if r is not None), key=lambda b: b["path"])
    return {"dataset": ix.dataset, "classes": len(ix.classes), "images": len(ix.images),
            "splits": {k: len(v) for k, v in splits.items()}, "unreadable": bad, "stray": [str(f) for f in ix.stray]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tactic datasets check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["check"])
    ap.add_argument("dataset")
    ap.add_argument("root")
    ap.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="the other prepare params (default: params.yaml)")
    ap.add_argument("--workers", type=int, help="decoding processes (default: one per core)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        cfg = PrepareParams(**{**load_params(args.params).prepare.model_dump(), "dataset": args.dataset, "root": args.root})
        report = check(cfg, args.workers)
    except (TacticError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - t0
    print(f"{report['dataset']}: {report['classes']} classes, {report['images']} images, all decoded in {seconds:.1f} s "
          f"({1000 * seconds / max(report['images'], 1):.1f} s per thousand); the splits prepare would make: "
          + ", ".join(f"{k} {v}" for k, v in report["splits"].items()))
    for f in report["stray"]:
        print(f"not an image (left out): {f}")
    for b in report["unreadable"]:
        print(f"unreadable: {b['path']}: {b['reason']}")
    print(f"unreadable images: {len(report['unreadable'])}; files that are not images: {len(report['stray'])}")
    return 1 if report["unreadable"] else 0
