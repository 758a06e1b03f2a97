"""The prepared form every stage after `prepare` reads.

    data/prepared/
      meta.json                      dataset, classes, channels, image size, split sizes
      manifest.json                  sha256 of every file below, for byte-identity checks
      {train,val,test}/images.npy    (N, H, W, C) uint8
      {train,val,test}/labels.npy    (N,) int64

`.npy` files are opened memory-mapped, so readers never hold a whole split in memory.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tactic.io import write_json

SPLITS = ("train", "val", "test")


class PreparedDataError(RuntimeError):
    pass


@dataclass
class Split:
    images: np.ndarray  # (N, H, W, C) uint8, memory-mapped
    labels: np.ndarray  # (N,) int64

    def __len__(self):
        return len(self.labels)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_prepared(out: str | Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], meta: dict) -> dict:
    """Write all splits to a temporary folder beside `out`, then swap it into place; returns meta.json's content."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700
    try:
        for name, (images, labels) in splits.items():
            (tmp / name).mkdir()
            np.save(tmp / name / "images.npy", np.ascontiguousarray(images, dtype=np.uint8))
            np.save(tmp / name / "labels.npy", np.asarray(labels, dtype=np.int64))
        counts = {name: int(len(labels)) for name, (_, labels) in splits.items()}
        meta = {**meta, "counts": counts}
        write_json(tmp / "meta.json", meta)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        write_json(tmp / "manifest.json", {str(p.relative_to(tmp)): sha256(p) for p in files})
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return meta
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def read_meta(root: str | Path) -> dict:
    path = Path(root) / "meta.json"
    if not path.is_file():
        raise PreparedDataError(f"{path} not found: run the prepare stage first (`dvc repro prepare`)")
    return json.loads(path.read_text())


def load_split(root: str | Path, name: str) -> Split:
    folder = Path(root) / name
    try:
        return Split(np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "labels.npy"))
    except FileNotFoundError as err:
        raise PreparedDataError(f"{err.filename} not found: run the prepare stage first (`dvc repro prepare`)") from None


def stratified_split(labels: np.ndarray, sizes: list[int], seed: int) -> list[np.ndarray]:
    """Disjoint index sets of the given sizes, each with the class proportions of `labels`."""
    if sum(sizes) > len(labels):
        raise ValueError(f"asked for {sum(sizes)} images, only {len(labels)} available")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    # A stable sort by label after a random permutation gives a random order within each class;
    # dealing the classes out round-robin then keeps every prefix stratified.
    by_class = order[np.argsort(labels[order], kind="stable")]
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = by_class[labels[by_class] == c]
        rank[members] = np.arange(len(members)) * len(labels) // len(members)
    dealt = by_class[np.lexsort((rng.random(len(by_class)), rank[by_class]))]
    out, start = [], 0
    for n in sizes:
        out.append(np.sort(dealt[start:start + n]))
        start += n
    return out
