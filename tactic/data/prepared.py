"""The prepared form every stage after `prepare` reads.

    data/prepared/
      meta.json                      dataset, classes, channels, image size, split sizes
      manifest.json                  sha256 of every file below, for byte-identity checks
      {train,val,test}/images.npy    (N, H, W, C) uint8
      {train,val,test}/labels.npy    (N,) int64 class indices, or (N, H, W) uint8 label masks
      skipped.json                   unreadable images left out: path, reason, split

`.npy` files are opened memory-mapped, so readers never hold a whole split in memory.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tactic.errors import TacticError
from tactic.io import process_token, remove_stale, sha256, temp_prefix, write_json

SPLITS = ("train", "val", "test")


class PreparedDataError(TacticError):
    """The prepared data is missing or not what a stage expects: run `prepare` (again)."""


@dataclass
class Split:
    images: np.ndarray  # (N, H, W, C) uint8, memory-mapped
    labels: np.ndarray  # (N,) int64 classes, or (N, H, W) uint8 masks (memory-mapped)

    def __len__(self):
        return len(self.labels)


class RowFile:
    """A preallocated .npy file whose rows `prepare`'s worker processes write in place.

    Workers write each decoded row at its offset (`pwrite`: no pixels travel between processes, no
    process maps or holds more than one row). Rows of images that turned out unreadable are dropped
    at the end by moving the later rows up; the header, a fixed 128 bytes, is then rewritten with the
    final count and the file truncated. `np.load` reads the result like any other .npy file.
    """
    HEADER = 128  # bytes, a multiple of 64 so the rows stay aligned for memory mapping

    def __init__(self, path: Path, rows: int, row_shape: tuple, dtype=np.uint8):
        self.path, self.rows, self.row_shape, self.dtype = Path(path), rows, tuple(row_shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        with open(self.path, "wb") as f:
            f.write(self._header(rows))
            f.truncate(self.HEADER + rows * self.row_bytes)

    def _header(self, rows: int) -> bytes:
        header = repr({"descr": self.dtype.str, "fortran_order": False, "shape": (rows, *self.row_shape)})
        header = header.ljust(self.HEADER - 11) + "\n"
        return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1")

    def write(self, fd: int, row: int, value: np.ndarray) -> None:
        """Write one row through `fd`, a descriptor of this file open for writing."""
        data = np.ascontiguousarray(value, dtype=self.dtype).tobytes()
        if len(data) != self.row_bytes:
            raise ValueError(f"{self.path.name}: row of shape {value.shape}, expected {self.row_shape}")
        os.pwrite(fd, data, self.HEADER + row * self.row_bytes)

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (ascending), in order."""
        fd = os.open(self.path, os.O_RDWR)
        try:
            for dst, src in enumerate(rows):
                if dst != src:
                    os.pwrite(fd, os.pread(fd, self.row_bytes, self.HEADER + src * self.row_bytes), self.HEADER + dst * self.row_bytes)
            os.pwrite(fd, self._header(len(rows)), 0)
            os.ftruncate(fd, self.HEADER + len(rows) * self.row_bytes)
        finally:
            os.close(fd)


@contextlib.contextmanager
def prepared_dir(out: str | Path):
    """A temporary folder beside `out` to write the prepared data into; on success the manifest is
    written and the folder swapped into place, so a reader never sees a half-prepared dataset."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent, temp_prefix(out))  # what a killed prepare left (a full-size images.npy)
    tmp = Path(tempfile.mkdtemp(prefix=f"{temp_prefix(out)}{process_token()}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700
    try:
        yield tmp
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        write_json(tmp / "manifest.json", {str(p.relative_to(tmp)): sha256(p) for p in files})
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
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
        return Split(np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "labels.npy", mmap_mode="r"))
    except FileNotFoundError as err:
        raise PreparedDataError(f"{err.filename} not found: run the prepare stage first (`dvc repro prepare`)") from None


def stratified_split(labels: np.ndarray, sizes: list[int], seed: int) -> list[np.ndarray]:
    """Disjoint index sets of the given sizes, each with the class proportions of `labels`."""
    if sum(sizes) > len(labels):
        raise TacticError(f"asked for {sum(sizes)} images, only {len(labels)} available")
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
