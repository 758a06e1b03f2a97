"""Tiny synthetic copies of the real datasets, in exactly the layouts they are distributed in.

For tests, benchmarks and for trying a dataset's path through the pipeline before downloading it:

    python -m tactic.data.fixtures rsscn7 /tmp/rsscn7 --per-class 6
    dvc exp run -S prepare.dataset=rsscn7 -S prepare.root=/tmp/rsscn7 -S prepare.size=32

Pixels are generated, seeded: each class has its own colour and stripe orientation (so a
classifier has something to learn), plus noise. Cityscapes masks hold a few labelIds in bands.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from tactic.data.layouts import RSSCN7_CLASSES

MINC_CLASSES = ["brick", "carpet", "ceramic", "fabric", "foliage", "food", "glass", "hair", "leather", "metal", "mirror",
                "other", "painted", "paper", "plastic", "polishedstone", "skin", "sky", "stone", "tile", "wallpaper",
                "water", "wood"]
RESISC_CLASSES = ["airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge", "chaparral", "church",
                  "circular_farmland", "cloud", "commercial_area", "dense_residential", "desert", "forest", "freeway",
                  "golf_course", "ground_track_field", "harbor", "industrial_area", "intersection", "island", "lake",
                  "meadow", "medium_residential", "mobile_home_park", "mountain", "overpass", "palace", "parking_lot",
                  "railway", "railway_station", "rectangular_farmland", "river", "roundabout", "runway", "sea_ice", "ship",
                  "snowberg", "sparse_residential", "stadium", "storage_tank", "tennis_court", "terrace",
                  "thermal_power_station", "wetland"]


def class_image(c: int, rng: np.random.Generator, size=(48, 48)) -> np.ndarray:
    """(H, W, 3) uint8: class `c`'s colour and stripe direction, a random phase, noise."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    angle = np.pi * ((c * 0.618) % 1)
    stripes = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 0.5 + rng.uniform(0, 2 * np.pi))
    colour = 60 + 150 * np.array([(c * 0.37) % 1, (c * 0.71) % 1, (c * 0.13) % 1])
    img = colour + 50 * stripes[..., None] + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90) if path.suffix.lower() in (".jpg", ".jpeg") else Image.fromarray(pixels).save(path)
    return path


def minc(root: Path, classes: int = 3, per_class: int = 6, seed: int = 0, size=(48, 48)) -> Path:
    """minc-2500/{categories.txt, images/<class>/<class>_NNNNNN.jpg, labels/{train,validate,test}{1..5}.txt}."""
    rng, root = np.random.default_rng(seed), Path(root) / "minc-2500"
    root.mkdir(parents=True, exist_ok=True)
    (root / "categories.txt").write_text("\n".join(MINC_CLASSES) + "\n")
    lists = {s: [] for s in ("train", "validate", "test")}
    for c, name in enumerate(MINC_CLASSES[:classes]):
        for i in range(per_class):
            rel = f"images/{name}/{name}_{i:06d}.jpg"
            _save(root / rel, class_image(c, rng, size))
            lists[("train", "train", "train", "train", "validate", "test")[i % 6]].append(rel)
    for split in range(1, 6):
        for name, rels in lists.items():
            (root / "labels").mkdir(exist_ok=True)
            (root / "labels" / f"{name}{split}.txt").write_text("".join(r + "\n" for r in rels))
    return root


def resisc(root: Path, classes: int = 3, per_class: int = 6, seed: int = 0, size=(48, 48)) -> Path:
    """NWPU-RESISC45/<class>/<class>_NNN.jpg."""
    rng, root = np.random.default_rng(seed), Path(root) / "NWPU-RESISC45"
    for c, name in enumerate(RESISC_CLASSES[:classes]):
        for i in range(1, per_class + 1):
            _save(root / name / f"{name}_{i:03d}.jpg", class_image(c, rng, size))
    return root


def rsscn7(root: Path, classes: int = 7, per_class: int = 6, seed: int = 0, size=(48, 48)) -> Path:
    """RSSCN7/<aGrass ... gParking>/<letter><NNN>.jpg."""
    rng, root = np.random.default_rng(seed), Path(root) / "RSSCN7"
    for c, name in enumerate(RSSCN7_CLASSES[:classes]):
        for i in range(1, per_class + 1):
            _save(root / name / f"{name[0]}{i:03d}.jpg", class_image(c, rng, size))
    return root


def imagenet(root: Path, classes: int = 3, per_class: int = 6, seed: int = 0, size=(48, 56), extra_classes: int = 2) -> Path:
    """train/<wnid>/<wnid>_<n>.JPEG, with `extra_classes` more WNIDs after the ones the test takes."""
    rng, root = np.random.default_rng(seed), Path(root) / "train"
    for c in range(classes + extra_classes):
        wnid = f"n{1440764 + 1000 * c:08d}"
        for i in range(per_class):
            _save(root / wnid / f"{wnid}_{1000 + i}.JPEG", class_image(c, rng, size))
    return root


def cityscapes(root: Path, per_split: dict | None = None, seed: int = 0, size=(32, 64)) -> Path:
    """leftImg8bit/<split>/<city>/<name>_leftImg8bit.png + gtFine/<split>/<city>/<name>_gtFine_labelIds.png.

    Each mask has horizontal bands of sky (23), building (11), car (26), road (7), and a strip of
    `unlabeled` (0) that the train-id mapping must turn into the ignore label.
    """
    rng, root = np.random.default_rng(seed), Path(root)
    h, w = size
    for split, cities in (per_split or {"train": {"aachen": 3, "bremen": 3}, "val": {"lindau": 2}}).items():
        for city, n in cities.items():
            for i in range(n):
                name = f"{city}_{i:06d}_000019"
                cuts = np.sort(rng.integers(1, h, 3))
                mask = np.select([np.arange(h)[:, None] < cuts[0], np.arange(h)[:, None] < cuts[1],
                                  np.arange(h)[:, None] < cuts[2]], [23, 11, 26], 7) * np.ones((1, w), int)
                mask[:, w // 2 - w // 16: w // 2 + w // 16] = 0  # inside the centre crop
                colours = {0: (0, 0, 0), 7: (128, 64, 128), 11: (70, 70, 70), 23: (70, 130, 180), 26: (0, 0, 142)}
                image = np.zeros((h, w, 3))
                for k, col in colours.items():
                    image[mask == k] = col
                image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
                _save(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", image)
                _save(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", mask.astype(np.uint8))
    return root


MAKERS = {"minc-2500": minc, "resisc-45": resisc, "rsscn7": rsscn7, "imagenet-50": imagenet, "cityscapes": cityscapes}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", choices=sorted(MAKERS))
    ap.add_argument("root", type=Path)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--per-class", type=int, default=6)
    args = ap.parse_args(argv)
    if args.dataset == "cityscapes":
        print(cityscapes(args.root))
    else:
        print(MAKERS[args.dataset](args.root, classes=args.classes, per_class=args.per_class))


if __name__ == "__main__":
    main()
