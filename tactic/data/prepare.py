"""Turn a dataset, as distributed, into the prepared form (see `tactic.data.prepared`).

    index (layout checked, nothing decoded) -> splits (official or seeded, stratified) -> size caps
      -> decode + resize in worker processes, in order -> .npy files streamed row by row

The splits are drawn before any pixel is decoded, so an unreadable image only drops itself: the
other images keep their split. The same params give byte-identical files (see manifest.json).
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from tactic import tracking
from tactic.config import PrepareParams
from tactic.data.errors import DatasetError
from tactic.data.images import Bad, load_pair
from tactic.data.layouts import Index, index as index_dataset, label_lut
from tactic.data.prepared import SPLITS, RowFile, prepared_dir, stratified_split
from tactic.errors import TacticError
from tactic.io import write_json


def choose_splits(ix: Index, cfg: PrepareParams) -> dict[str, np.ndarray]:
    """Positions in `ix.images` per split: the official split where there is one (a validation split
    carved from its training part if it has none), else a seeded stratified split by fractions; then
    each split capped at `<split>_size` by a stratified draw (null: the dataset's default cap, none for
    the real datasets). A cap is a cap: a split smaller than it is kept whole."""
    labels, seed = ix.labels(), cfg.split_seed
    caps = {name: getattr(cfg, f"{name}_size") or ix.default_caps.get(name) for name in SPLITS}

    def capped(name: str, n: int) -> int:
        return min(caps[name], n) if caps[name] else n

    official = {k: np.asarray(v, dtype=np.int64) for k, v in (ix.official or {}).items()}
    if "test" not in official:  # no official split at all
        n = len(labels)
        n_test = capped("test", round(cfg.test_fraction * n))
        n_val = capped("val", round(cfg.val_fraction * (n - n_test)))
        n_train = capped("train", n - n_test - n_val)
        _check_sizes(ix, {"train": n_train, "val": n_val, "test": n_test}, n, "the whole dataset")
        test, val, train = stratified_split(labels, [n_test, n_val, n_train], seed)
        return {"train": train, "val": val, "test": test}
    if "val" not in official:
        pool = official["train"]
        n_val = capped("val", round(cfg.val_fraction * len(pool)))
        n_train = capped("train", len(pool) - n_val)
        _check_sizes(ix, {"train": n_train, "val": n_val}, len(pool), "its official training split")
        train, val = (pool[i] for i in stratified_split(labels[pool], [n_train, n_val], seed))
        official.update(train=train, val=val)
        caps.update(train=None, val=None)
    out = {}
    for name in SPLITS:
        pool = official[name]
        if caps[name] and caps[name] < len(pool):
            pool = pool[stratified_split(labels[pool], [caps[name]], seed)[0]]
        out[name] = pool
    return out


def _check_sizes(ix: Index, sizes: dict, have: int, what: str) -> None:
    empty = [k for k, v in sizes.items() if v <= 0]
    if empty:
        raise TacticError(f"prepare: the {empty[0]} split of {ix.dataset} would be empty ({have} images in {what}); "
                          "change prepare.test_fraction or prepare.val_fraction (the *_size params only cap a split)")


@dataclass(frozen=True)
class _Out:
    """Where and how one split's rows are decoded to (pickled to the workers with each chunk)."""
    images: RowFile
    masks: Optional[RowFile]
    size: Optional[int]
    channels: int
    lut: Optional[np.ndarray]


class _WrongSize(Bad):
    pass


_FDS: dict = {}  # RowFile path -> a descriptor open for writing, in each process


def _fill(task, out: _Out):
    """Decode one image (and mask) into its row; returns its class label, None (mask) or a `Bad`."""
    row, item, target = task
    image, target = load_pair(item, out.size, out.channels, target, out.lut)
    if isinstance(image, Bad):
        return image
    if image.shape != out.images.row_shape:
        return _WrongSize(str(item), f"{image.shape[1]}x{image.shape[0]}, the first image {out.images.row_shape[1]}x{out.images.row_shape[0]}")
    for file, value in ((out.images, image), (out.masks, target)):
        if file is not None:
            if str(file.path) not in _FDS:
                _FDS[str(file.path)] = os.open(file.path, os.O_WRONLY)
            file.write(_FDS[str(file.path)], row, value)
    return None if out.masks else target


def _row_shape(ix: Index, positions, cfg: PrepareParams, lut) -> tuple:
    if cfg.size is not None:
        return (cfg.size, cfg.size, ix.channels)
    for i in positions:  # as stored: the first readable image sets the size for all
        image, _ = load_pair(ix.images[i], None, ix.channels, ix.targets[i], lut)
        if not isinstance(image, Bad):
            return image.shape
    return (0, 0, ix.channels)


def _write_split(folder: Path, ix: Index, positions: np.ndarray, cfg: PrepareParams, pool, skipped: list) -> int:
    folder.mkdir()
    lut = label_lut(ix.dataset)
    shape = _row_shape(ix, positions, cfg, lut)
    segmentation = ix.task == "segmentation"
    out = _Out(RowFile(folder / "images.npy", len(positions), shape),
               RowFile(folder / "labels.npy", len(positions), shape[:2]) if segmentation else None,
               cfg.size, ix.channels, lut)
    tasks = ((row, ix.images[i], ix.targets[i]) for row, i in enumerate(positions))
    fill = functools.partial(_fill, out=out)
    results = pool.imap(fill, tasks, chunksize=16) if pool else map(fill, tasks)
    kept, labels = [], []
    try:
        for row, result in enumerate(tqdm(results, total=len(positions), file=sys.stderr, desc=f"prepare {folder.name}",
                                          disable=None, leave=False)):
            if isinstance(result, _WrongSize):
                raise TacticError(f"prepare.size: images differ in size ({result.path}: {result.reason}); set a size")
            if isinstance(result, Bad):
                if cfg.strict:
                    raise DatasetError(f"{ix.dataset}: unreadable image {result.path}: {result.reason} (prepare.strict is on)")
                skipped.append({"path": result.path, "reason": result.reason, "split": folder.name})
                continue
            kept.append(row)
            labels.append(result)
    finally:
        for fd in _FDS.values():  # this process's own (serial decoding); workers' close when they end
            os.close(fd)
        _FDS.clear()
    for file in (out.images, out.masks):
        if file is not None:
            file.keep(kept)
    if not segmentation:
        np.save(folder / "labels.npy", np.asarray(labels, dtype=np.int64))
    return len(kept)


def _check_classes(ix: Index, folder: Path) -> None:
    if ix.task != "classification":
        return
    counts = np.bincount(np.load(folder / "labels.npy"), minlength=len(ix.classes))
    if (counts == 0).any():
        empty = ix.classes[int(np.flatnonzero(counts == 0)[0])]
        raise DatasetError(f"{ix.dataset}: class {empty!r} has no images left in the {folder.name} split "
                           f"(see the unreadable images in skipped.json, or raise prepare.{folder.name}_size)")


def _worker_start() -> None:
    """In each worker of the decoding pool: SIGTERM ends it, whatever handler the caller had
    installed (a fork inherits its parent's Python handlers). `Pool.terminate` relies on SIGTERM
    killing workers that wait on the pool's queue lock; in one test run a worker forked from a test
    process with handlers of its own stayed waiting there, and `prepare` hung in `terminate`."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def prepare(cfg: PrepareParams, out: str | Path) -> dict:
    """Read `cfg.dataset` from `cfg.root`, split it per `cfg`, write it to `out`; returns meta.json's content."""
    ix = index_dataset(cfg)
    splits = choose_splits(ix, cfg)
    workers = cfg.workers or os.cpu_count() or 1
    skipped = [{"path": str(f), "reason": "not an image", "split": None} for f in ix.stray]
    counts = {}
    # fork: the workers need no imports of their own, and start in milliseconds.
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    # In-memory data (Fashion-MNIST at its own size) is cheaper to copy here than to ship to workers.
    files = isinstance(ix.images[0], Path) or cfg.size is not None
    pool = ctx.Pool(workers, initializer=_worker_start) if files and workers > 1 and sum(map(len, splits.values())) >= 16 else None
    try:
        with prepared_dir(out) as tmp:
            for name in SPLITS:
                counts[name] = _write_split(tmp / name, ix, splits[name], cfg, pool, skipped)
                if name == "train":
                    _check_classes(ix, tmp / name)
            shape = np.load(tmp / "train" / "images.npy", mmap_mode="r").shape
            meta = {"dataset": ix.dataset, "task": ix.task, "classes": ix.classes, "channels": ix.channels,
                    "size": list(shape[1:3]), "split_seed": cfg.split_seed, "counts": counts,
                    "skipped": len(skipped) - len(ix.stray), "stray": len(ix.stray), **ix.extra}
            write_json(tmp / "skipped.json", skipped)
            write_json(tmp / "meta.json", meta)
    finally:
        if pool:
            pool.terminate()
    return meta


def prepare_tracked(cfg: PrepareParams, out: str | Path) -> dict:
    """The `prepare` stage: `prepare` inside an MLflow run that logs the counts and the skipped images."""
    out = Path(out)
    with tracking.start_run("prepare", "prepare", {"stage": "prepare", **cfg.model_dump()}):
        meta = prepare(cfg, out)
        tracking.log_metrics({**{f"num_{k}": v for k, v in meta["counts"].items()}, "num_skipped": meta["skipped"]})
        tracking.log_artifact(out / "skipped.json")
    return meta
