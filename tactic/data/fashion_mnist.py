"""Fashion-MNIST as Debian's `dataset-fashion-mnist` ships it: gzipped idx files."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from tactic.data.errors import DatasetError

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
LAYOUT = "<root>/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz"
INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, run `apt-get update` first) or set prepare.root"


def _read_idx(path: Path, magic: int) -> np.ndarray:
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as err:
        raise DatasetError(f"{path}: unreadable idx file ({err})") from None
    dims = raw[3]
    if int.from_bytes(raw[:4], "big") != magic:
        raise DatasetError(f"{path}: not an idx file with magic {magic}")
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise DatasetError(f"{path}: truncated ({data.size} values, header says {shape})")
    return data.reshape(shape)


def load(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images as (N, 28, 28, 1) uint8 and labels as (N,) int64."""
    root = Path(root)
    images_file, labels_file = (root / f for f in FILES[split])
    for f in (images_file, labels_file):
        if not f.is_file():
            raise DatasetError(f"fashion-mnist: {f} not found; expected layout {LAYOUT}; {INSTALL_HINT}")
    images = _read_idx(images_file, 2051)[..., None]
    labels = _read_idx(labels_file, 2049).astype(np.int64)
    if len(images) != len(labels):
        raise DatasetError(f"fashion-mnist: {len(images)} images but {len(labels)} labels in {root}")
    return images, labels
