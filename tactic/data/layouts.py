"""The datasets as they are distributed, indexed without decoding a pixel.

`index(cfg)` checks the layout of `cfg.root` for `cfg.dataset` and returns an `Index`: the class
names, one entry per image (its path and its class, or its label-mask path for segmentation) and
the dataset's official split where it has one. A layout that does not match fails here, before any
work, naming the dataset, the layout expected and the first path that does not match it.

    dataset       expected under prepare.root                                          classes
    fashion-mnist {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz (Debian package)         10
    minc-2500     categories.txt, images/<class>/<class>_NNNNNN.jpg,                       23
                  labels/{train,validate,test}{1..5}.txt
    resisc-45     <class>/<class>_NNN.jpg  (the NWPU-RESISC45 folder)                      45
    rsscn7        aGrass bField cIndustry dRiverLake eForest fResident gParking /<image>    7
    imagenet-50   n<8 digits>/<wnid>_<n>.JPEG  (ILSVRC2012 train); first 50 WNIDs sorted   50
    cityscapes    leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png and                19
                  gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png
    fashion-mnist-canvases  as fashion-mnist: the embedded segmentation set built from it    11
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from tactic.data import fashion_mnist
from tactic.data.errors import DatasetError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
RSSCN7_CLASSES = ["aGrass", "bField", "cIndustry", "dRiverLake", "eForest", "fResident", "gParking"]
CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle"]
# Cityscapes labelIds -> the 19 train ids of its benchmark (cityscapesScripts' labels.py); the rest -> 255.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
IGNORE = 255

LAYOUTS = {
    "fashion-mnist": fashion_mnist.LAYOUT,
    "fashion-mnist-canvases": fashion_mnist.LAYOUT,
    "minc-2500": "<root>/{categories.txt, images/<class>/<class>_NNNNNN.jpg, labels/{train,validate,test}{1..5}.txt}",
    "resisc-45": "<root>/<class>/<class>_NNN.jpg (45 class folders, the NWPU-RESISC45 folder as root)",
    "rsscn7": f"<root>/{{{','.join(RSSCN7_CLASSES)}}}/<image>.jpg",
    "imagenet-50": "<root>/n<8 digits>/<wnid>_<n>.JPEG (the ILSVRC2012 train folder; the first 50 WNIDs in sorted order)",
    "cityscapes": "<root>/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png with "
                  "<root>/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png",
}
# The folder name a dataset unpacks to: a root one level above it is accepted too.
TOP_FOLDER = {"minc-2500": "minc-2500", "resisc-45": "NWPU-RESISC45", "rsscn7": "RSSCN7", "imagenet-50": "train"}


@dataclass
class Index:
    dataset: str
    classes: list[str]
    images: list  # a Path per image (an array for fashion-mnist, which ships as one file)
    targets: list  # class index per image, or a label-mask Path (segmentation)
    official: Optional[dict[str, list[int]]] = None  # split -> positions in `images`; "val" may be missing
    task: str = "classification"
    channels: int = 3
    extra: dict = field(default_factory=dict)  # for meta.json
    stray: list = field(default_factory=list)  # files that are no image (Thumbs.db, .DS_Store): left out, listed
    # Split caps where `prepare.<split>_size` is null: none for the real datasets (all of each split),
    # EMBEDDED_CAPS for the embedded sets, so that the default run fits 15 minutes on 2 CPU cores.
    default_caps: dict = field(default_factory=dict)

    def labels(self) -> np.ndarray:
        """Class per image for stratified splits (all 0 for segmentation: a plain seeded split)."""
        if self.task == "segmentation":
            return np.zeros(len(self.images), dtype=np.int64)
        return np.asarray(self.targets, dtype=np.int64)


EMBEDDED_CAPS = {"train": 4000, "val": 1000, "test": 2000}


def label_lut(dataset: str) -> Optional[np.ndarray]:
    """Cityscapes label id -> train id (the rest IGNORE) as a 256-entry table; None for other datasets."""
    if dataset != "cityscapes":
        return None
    lut = np.full(256, IGNORE, dtype=np.uint8)
    lut[list(CITYSCAPES_TRAIN_IDS)] = list(CITYSCAPES_TRAIN_IDS.values())
    return lut


def _fail(dataset: str, problem: str) -> DatasetError:
    return DatasetError(f"{dataset}: {problem}; expected layout {LAYOUTS[dataset]}")


def _root(dataset: str, root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise _fail(dataset, f"root {root} is not a folder (prepare.root)")
    top = TOP_FOLDER.get(dataset)
    return root / top if top and (root / top).is_dir() and not (root / top).samefile(root) else root


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _is_stray(f: Path) -> bool:
    """What archives carry beside the images: Thumbs.db, desktop.ini, macOS's .DS_Store and ._ copies,
    notes, folders. Left out and listed in skipped.json; a misnamed image is still a layout error."""
    return not f.is_file() or f.name.startswith(".") or f.suffix.lower() not in IMAGE_SUFFIXES


def _take(dataset: str, found: list[str], expected: int, limit: Optional[int], at_least: bool = False) -> list[str]:
    """The classes used: all `expected` of them (or the first `expected` when `at_least`), or the
    first `limit` when prepare.classes asks for a subset."""
    want = limit or expected
    if len(found) < want or (not limit and not at_least and len(found) != expected):
        raise _fail(dataset, f"found {len(found)} classes, expected {'at least ' if at_least or limit else ''}{want}"
                             + ("" if limit else " (prepare.classes takes a subset)"))
    return found[:want]


def _class_folders(dataset: str, root: Path, names: list[str], file_re: str) -> Index:
    """One folder per class, images inside named per `file_re` (`{cls}` is the class name)."""
    images, targets, stray = [], [], []
    for c, name in enumerate(names):
        folder = root / name
        if not folder.is_dir():
            raise _fail(dataset, f"class folder {folder} not found")
        pattern = re.compile(file_re.format(cls=re.escape(name)), re.IGNORECASE)
        files = []
        for f in sorted(folder.iterdir()):
            if _is_stray(f):
                stray.append(f)
            elif not pattern.fullmatch(f.name):
                raise _fail(dataset, f"{f} does not match")
            else:
                files.append(f)
        if not files:
            raise _fail(dataset, f"class folder {folder} holds no images")
        images += files
        targets += [c] * len(files)
    return Index(dataset, names, images, targets, stray=stray)


def _split_files(dataset: str, index: Index, folder: str | Path, root: Path) -> Index:
    """prepare.split_files: `{train,val,test}.txt` listing image paths relative to the root (val optional)."""
    folder = Path(folder)
    where = {p.relative_to(root).as_posix(): i for i, p in enumerate(index.images)}
    official = {}
    for split in ("train", "val", "test"):
        path = folder / f"{split}.txt"
        if not path.is_file():
            if split == "val":
                continue
            raise _fail(dataset, f"split file {path} not found (prepare.split_files wants train.txt, test.txt, optional val.txt)")
        official[split] = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                if line.strip() not in where:
                    raise _fail(dataset, f"{path}:{n}: {line.strip()} is not an image of the dataset (classes in use: {len(index.classes)})")
                official[split].append(where[line.strip()])
    index.official = official
    return index


def fashion_mnist_index(cfg) -> Index:
    images, labels = fashion_mnist.load(cfg.root, "train")
    test_images, test_labels = fashion_mnist.load(cfg.root, "test")
    classes = _take("fashion-mnist", fashion_mnist.CLASSES, 10, cfg.classes)
    keep = np.flatnonzero(np.concatenate([labels, test_labels]) < len(classes))
    all_images, all_labels = np.concatenate([images, test_images])[keep], np.concatenate([labels, test_labels])[keep]
    n_train = int((keep < len(labels)).sum())
    return Index("fashion-mnist", classes, list(all_images), all_labels.tolist(),
                 {"train": list(range(n_train)), "test": list(range(n_train, len(keep)))}, channels=1,
                 default_caps=EMBEDDED_CAPS)


def canvases_index(cfg) -> Index:
    """The embedded segmentation set: canvases of Fashion-MNIST items (see `tactic.data.canvases`).

    Train and validation canvases come from disjoint parts of the official training items, test
    canvases from the test items, each with its own seed, so no item appears in two splits. A split
    size is its number of canvases (null: EMBEDDED_CAPS, as for fashion-mnist)."""
    from tactic.data.canvases import canvas_classes, make_canvases
    from tactic.data.prepared import stratified_split

    images, labels = fashion_mnist.load(cfg.root, "train")
    test_images, test_labels = fashion_mnist.load(cfg.root, "test")
    classes = _take("fashion-mnist-canvases", fashion_mnist.CLASSES, 10, cfg.classes)
    n_val = round(cfg.val_fraction * len(labels))
    train_items, val_items = stratified_split(labels, [len(labels) - n_val, n_val], cfg.split_seed)
    out, official = ([], []), {}
    for k, (name, imgs, labs, cap) in enumerate((("train", images[train_items], labels[train_items], cfg.train_size),
                                                 ("val", images[val_items], labels[val_items], cfg.val_size),
                                                 ("test", test_images, test_labels, cfg.test_size))):
        keep = labs < len(classes)
        canvases, masks = make_canvases(imgs[keep], labs[keep], cap or EMBEDDED_CAPS[name], size=cfg.canvas_size,
                                        items=tuple(cfg.canvas_items), seed=1000 * cfg.split_seed + k)
        official[name] = list(range(len(out[0]), len(out[0]) + len(canvases)))
        out[0].extend(canvases)
        out[1].extend(masks)
    return Index("fashion-mnist-canvases", canvas_classes(classes), out[0], out[1], official, task="segmentation",
                 channels=1, extra={"ignore_index": IGNORE, "canvas_size": cfg.canvas_size, "canvas_items": list(cfg.canvas_items)})


def minc_index(cfg) -> Index:
    root = _root("minc-2500", cfg.root)
    cats = root / "categories.txt"
    if not cats.is_file():
        raise _fail("minc-2500", f"{cats} not found")
    names = _take("minc-2500", [c.strip() for c in cats.read_text().splitlines() if c.strip()], 23, cfg.classes)
    images, targets, official = [], [], {}
    for split, ours in (("train", "train"), ("validate", "val"), ("test", "test")):
        path = root / "labels" / f"{split}{cfg.split}.txt"
        if not path.is_file():
            raise _fail("minc-2500", f"split file {path} not found (prepare.split = {cfg.split})")
        official[ours] = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            rel = line.strip()
            if not rel:
                continue
            m = re.fullmatch(r"images/([^/]+)/\1_\d+\.jpg", rel)
            if not m:
                raise _fail("minc-2500", f"{path}:{n}: {rel} does not match images/<class>/<class>_NNNNNN.jpg")
            if m.group(1) not in names:
                if cfg.classes is None:
                    raise _fail("minc-2500", f"{path}:{n}: class {m.group(1)} is not in {cats}")
                continue  # outside the subset prepare.classes asked for
            if not (root / rel).is_file():
                raise _fail("minc-2500", f"{root / rel} not found (listed in {path}:{n})")
            official[ours].append(len(images))
            images.append(root / rel)
            targets.append(names.index(m.group(1)))
    return Index("minc-2500", names, images, targets, official, extra={"split": cfg.split})


def resisc_index(cfg) -> Index:
    root = _root("resisc-45", cfg.root)
    found = [p.name for p in _visible(root) if p.is_dir()]
    index = _class_folders("resisc-45", root, _take("resisc-45", found, 45, cfg.classes), r"{cls}_\d+\.jpg")
    return _split_files("resisc-45", index, cfg.split_files, root) if cfg.split_files else index


def rsscn7_index(cfg) -> Index:
    root = _root("rsscn7", cfg.root)
    extra = [p for p in _visible(root) if p.is_dir() and p.name not in RSSCN7_CLASSES]
    if extra:
        raise _fail("rsscn7", f"{extra[0]} is not one of the seven class folders")
    names = RSSCN7_CLASSES[:cfg.classes] if cfg.classes else RSSCN7_CLASSES
    suffixes = "|".join(s[1:] for s in IMAGE_SUFFIXES)
    index = _class_folders("rsscn7", root, names, rf"[^/]+\.({suffixes})")
    return _split_files("rsscn7", index, cfg.split_files, root) if cfg.split_files else index


def imagenet_index(cfg) -> Index:
    root = _root("imagenet-50", cfg.root)
    dirs = [p for p in _visible(root) if p.is_dir()]
    odd = [p for p in dirs if not re.fullmatch(r"n\d{8}", p.name)]
    if odd:
        raise _fail("imagenet-50", f"{odd[0]} is not a WNID folder")
    names = _take("imagenet-50", [p.name for p in dirs], 50, cfg.classes, at_least=True)
    index = _class_folders("imagenet-50", root, names, r"{cls}_\d+\.jpe?g")
    if cfg.val_root:
        # The official validation images, sorted into WNID folders, become the test split.
        val = _class_folders("imagenet-50", _root("imagenet-50", cfg.val_root), names, r"[^/]+\.jpe?g")
        n = len(index.images)
        index.official = {"train": list(range(n)), "test": list(range(n, n + len(val.images)))}
        index.images += val.images
        index.targets += val.targets
        index.stray += val.stray
    elif cfg.split_files:
        index = _split_files("imagenet-50", index, cfg.split_files, root)
    return index


def cityscapes_index(cfg) -> Index:
    root = _root("cityscapes", cfg.root)
    images, masks, official, stray = [], [], {}, []
    # The test split's labels are withheld by the benchmark: its val split is our test split.
    for split, ours in (("train", "train"), ("val", "test")):
        folder = root / "leftImg8bit" / split
        if not folder.is_dir():
            raise _fail("cityscapes", f"{folder} not found")
        official[ours] = []
        for city in _visible(folder):
            for f in sorted(city.iterdir()):
                if _is_stray(f):
                    stray.append(f)
                    continue
                if not f.name.endswith("_leftImg8bit.png"):
                    raise _fail("cityscapes", f"{f} does not match")
                mask = root / "gtFine" / split / city.name / f.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
                if not mask.is_file():
                    raise _fail("cityscapes", f"label {mask} not found for {f}")
                official[ours].append(len(images))
                images.append(f)
                masks.append(mask)
        if not official[ours]:
            raise _fail("cityscapes", f"{folder} holds no images")
    return Index("cityscapes", CITYSCAPES_CLASSES, images, masks, official, task="segmentation",
                 extra={"ignore_index": IGNORE}, stray=stray)


INDEXERS = {"fashion-mnist": fashion_mnist_index, "minc-2500": minc_index, "resisc-45": resisc_index,
            "rsscn7": rsscn7_index, "imagenet-50": imagenet_index, "cityscapes": cityscapes_index,
            "fashion-mnist-canvases": canvases_index}


def index(cfg) -> Index:
    return INDEXERS[cfg.dataset](cfg)
