"""The five real datasets, as generated fixtures in their distributed layouts, through `prepare`."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tactic.config import PrepareParams
from tactic.data import fixtures
from tactic.data.errors import DatasetError
from tactic.data.images import load_image
from tactic.data.prepare import prepare
from tactic.data.prepared import load_split, read_meta
from tests.helpers import CLASSIFICATION

def _cfg(dataset, root, **kw):
    return PrepareParams(dataset=dataset, root=str(root), size=32, workers=2, **kw)


@pytest.mark.parametrize("dataset", sorted(CLASSIFICATION))
def test_classification_layouts_prepare(dataset, tmp_path):
    make, make_kw, cfg_kw = CLASSIFICATION[dataset]
    make(tmp_path / "raw", **make_kw)
    meta = prepare(_cfg(dataset, tmp_path / "raw", **cfg_kw), tmp_path / "out")
    n_classes = make_kw.get("classes", 7)
    assert len(meta["classes"]) == n_classes and meta["channels"] == 3 and meta["size"] == [32, 32]
    total = sum(meta["counts"].values())
    assert total == n_classes * 6 and meta["skipped"] == 0
    train = load_split(tmp_path / "out", "train")
    assert train.images.shape == (meta["counts"]["train"], 32, 32, 3) and train.images.dtype == np.uint8
    assert set(np.unique(train.labels)) == set(range(n_classes))
    # The stripes of each class survive the resize: a class's mean colour differs from the others'.
    assert len({tuple(train.images[train.labels == c].mean((0, 1, 2)).round()) for c in range(n_classes)}) == n_classes


def test_minc_uses_the_official_split(tmp_path):
    root = fixtures.minc(tmp_path / "raw", classes=2)
    (root / "labels" / "train2.txt").write_text("images/brick/brick_000000.jpg\nimages/carpet/carpet_000000.jpg\n")
    meta = prepare(_cfg("minc-2500", tmp_path / "raw", classes=2, split=2), tmp_path / "out")
    assert meta["counts"] == {"train": 2, "val": 2, "test": 2} and meta["split"] == 2


def test_imagenet_takes_the_first_wnids_in_sorted_order(tmp_path):
    fixtures.imagenet(tmp_path / "raw", classes=3, extra_classes=2)
    meta = prepare(_cfg("imagenet-50", tmp_path / "raw", classes=3), tmp_path / "out")
    assert meta["classes"] == ["n01440764", "n01441764", "n01442764"]
    with pytest.raises(DatasetError, match="found 5 classes, expected at least 50"):
        prepare(_cfg("imagenet-50", tmp_path / "raw"), tmp_path / "out2")


def test_imagenet_official_validation_folder_is_the_test_split(tmp_path):
    fixtures.imagenet(tmp_path / "raw", classes=2, extra_classes=0)
    val = tmp_path / "val"
    for wnid in ("n01440764", "n01441764"):
        (val / wnid).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(fixtures.class_image(0, np.random.default_rng(i))).save(val / wnid / f"ILSVRC2012_val_{i:08d}.JPEG")
    meta = prepare(_cfg("imagenet-50", tmp_path / "raw", classes=2, val_root=str(val)), tmp_path / "out")
    assert meta["counts"]["test"] == 4 and meta["counts"]["train"] + meta["counts"]["val"] == 12


def test_split_files(tmp_path):
    root = fixtures.resisc(tmp_path / "raw", classes=2, per_class=3)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("airplane/airplane_001.jpg\nairport/airport_001.jpg\nairplane/airplane_002.jpg\n")
    (lists / "test.txt").write_text("airplane/airplane_003.jpg\nairport/airport_003.jpg\n")
    meta = prepare(_cfg("resisc-45", root, classes=2, split_files=str(lists), val_fraction=0.34), tmp_path / "out")
    assert meta["counts"] == {"train": 2, "val": 1, "test": 2}
    (lists / "test.txt").write_text("airplane/nope.jpg\n")
    with pytest.raises(DatasetError, match=r"test.txt:1: airplane/nope.jpg is not an image of the dataset"):
        prepare(_cfg("resisc-45", root, classes=2, split_files=str(lists)), tmp_path / "out2")


def test_cityscapes_masks_map_to_train_ids(tmp_path):
    fixtures.cityscapes(tmp_path / "raw")
    meta = prepare(_cfg("cityscapes", tmp_path / "raw"), tmp_path / "out")
    assert meta["task"] == "segmentation" and len(meta["classes"]) == 19 and meta["ignore_index"] == 255
    assert meta["counts"]["test"] == 2 and meta["counts"]["train"] + meta["counts"]["val"] == 6
    split = load_split(tmp_path / "out", "train")
    assert split.labels.shape == (len(split), 32, 32) and split.labels.dtype == np.uint8
    # labelIds 7, 11, 23, 26 -> train ids 0, 2, 10, 13; unlabeled (0) -> ignored (255)
    assert set(np.unique(split.labels)) <= {0, 2, 10, 13, 255} and (split.labels == 255).any()
    # Masks are resized with the images: the car band (13) is where the image is dark blue.
    car = split.labels == 13
    assert split.images[car][:, 2].mean() > split.images[car][:, 0].mean() + 60


@pytest.mark.parametrize("dataset", sorted(CLASSIFICATION) + ["cityscapes"])
def test_missing_root_names_dataset_and_layout(dataset, tmp_path):
    with pytest.raises(DatasetError) as err:
        prepare(_cfg(dataset, tmp_path / "nowhere"), tmp_path / "out")
    assert dataset in str(err.value) and "expected layout" in str(err.value) and "nowhere" in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dataset, break_it, first_bad", [
    ("resisc-45", lambda r: (r / "airplane" / "airplane_001.jpg").rename(r / "airplane" / "plane1.jpg"), "plane1.jpg"),
    ("minc-2500", lambda r: (r / "labels" / "validate1.txt").unlink(), "validate1.txt"),
    ("rsscn7", lambda r: (r / "aGrass").rename(r / "grass"), "grass"),
    ("imagenet-50", lambda r: (r / "n01440764").rename(r / "fish"), "fish"),
    ("cityscapes", lambda r: next((r / "gtFine" / "val").rglob("*labelIds.png")).unlink(), "_gtFine_labelIds.png"),
])
def test_wrong_layout_names_the_first_path_that_does_not_match(dataset, break_it, first_bad, tmp_path):
    make = {**{k: v[0] for k, v in CLASSIFICATION.items()}, "cityscapes": fixtures.cityscapes}[dataset]
    root = make(tmp_path / "raw")
    break_it(root)
    with pytest.raises(DatasetError) as err:
        prepare(_cfg(dataset, tmp_path / "raw", classes=3 if dataset != "cityscapes" else None), tmp_path / "out")
    assert first_bad in str(err.value) and "expected layout" in str(err.value)


def test_class_count_must_match_the_dataset(tmp_path):
    fixtures.resisc(tmp_path / "raw", classes=3)
    with pytest.raises(DatasetError, match="found 3 classes, expected 45"):
        prepare(_cfg("resisc-45", tmp_path / "raw"), tmp_path / "out")


def _corrupt(path):
    path.write_bytes(path.read_bytes()[:200])  # a truncated JPEG


def test_unreadable_images_are_reported_and_skipped(tmp_path):
    root = fixtures.rsscn7(tmp_path / "raw")
    _corrupt(root / "bField" / "b002.jpg")
    (root / "cIndustry" / "c003.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    meta = prepare(_cfg("rsscn7", tmp_path / "raw"), out)
    skipped = json.loads((out / "skipped.json").read_text())
    assert meta["skipped"] == 2 and sum(meta["counts"].values()) == 40
    assert sorted(s["path"].rsplit("/", 1)[1] for s in skipped) == ["b002.jpg", "c003.jpg"]
    assert all(s["reason"] for s in skipped)
    # The rows after a skipped one moved up with their labels: every image still shows its class's colour.
    colours = np.array([60 + 150 * np.array([(c * 0.37) % 1, (c * 0.71) % 1, (c * 0.13) % 1]) for c in range(7)])
    for name in ("train", "val", "test"):
        split = load_split(out, name)
        means = split.images.reshape(len(split), -1, 3).mean(1)
        nearest = np.abs(means[:, None] - colours[None]).sum(-1).argmin(1)
        assert (nearest == split.labels).all()


def test_strict_stops_at_the_first_unreadable_image(tmp_path):
    root = fixtures.rsscn7(tmp_path / "raw")
    _corrupt(root / "bField" / "b002.jpg")
    with pytest.raises(DatasetError, match=r"unreadable image .*b002.jpg.*prepare.strict"):
        prepare(_cfg("rsscn7", tmp_path / "raw", strict=True), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_class_with_no_images_left_is_an_error(tmp_path):
    root = fixtures.rsscn7(tmp_path / "raw", per_class=3)
    for f in (root / "gParking").iterdir():
        _corrupt(f)
    with pytest.raises(DatasetError, match="class 'gParking' has no images left in the train split"):
        prepare(_cfg("rsscn7", tmp_path / "raw"), tmp_path / "out")


def test_same_params_give_byte_identical_data_serial_or_parallel(tmp_path):
    fixtures.resisc(tmp_path / "raw", classes=3)
    prepare(_cfg("resisc-45", tmp_path / "raw", classes=3).model_copy(update={"workers": 1}), tmp_path / "a")
    prepare(_cfg("resisc-45", tmp_path / "raw", classes=3), tmp_path / "b")
    assert (tmp_path / "a/manifest.json").read_text() == (tmp_path / "b/manifest.json").read_text()
    other_seed = _cfg("resisc-45", tmp_path / "raw", classes=3, split_seed=1)
    prepare(other_seed, tmp_path / "c")
    assert not np.array_equal(load_split(tmp_path / "a", "test").images, load_split(tmp_path / "c", "test").images)
    assert read_meta(tmp_path / "a")["counts"] == read_meta(tmp_path / "c")["counts"]


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "RGB"])
def test_any_colour_mode_becomes_rgb(mode, tmp_path):
    rgb = Image.fromarray(fixtures.class_image(2, np.random.default_rng(0)))
    path = tmp_path / f"x.{'jpg' if mode in ('L', 'CMYK', 'RGB') else 'png'}"
    (rgb.convert(mode) if mode != "P" else rgb.quantize(16)).save(path)
    out = load_image(path, 32, 3)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8 and out.std() > 5


STRAYS = ("Thumbs.db", "desktop.ini", ".DS_Store", "._b001.jpg", "README.txt")


@pytest.mark.parametrize("dataset", sorted(set(CLASSIFICATION) - {"minc-2500"}) + ["cityscapes"])
def test_stray_files_are_left_out_and_listed_never_a_layout_failure(dataset, tmp_path):
    """What downloaded archives carry beside the images (Windows thumbnails, macOS metadata, notes).
    (MINC-2500 reads only the files its label lists name: nothing else in its folders is looked at.)"""
    make = {**{k: v[0] for k, v in CLASSIFICATION.items()}, "cityscapes": fixtures.cityscapes}[dataset]
    root = make(tmp_path / "raw")
    kw = {"classes": 3} if dataset not in ("cityscapes", "rsscn7") else {}
    clean = prepare(_cfg(dataset, root, **kw), tmp_path / "clean")
    folder = next(p.parent for p in sorted(root.rglob("*")) if p.suffix.lower() in (".jpg", ".jpeg", ".png")
                  and "gtFine" not in p.parts and not p.name.startswith("."))
    for name in STRAYS:
        (folder / name).write_bytes(b"\x00not an image")
    (folder / "__MACOSX").mkdir()
    for strict in (False, True):  # strict is about unreadable images, not about files that are none
        meta = prepare(_cfg(dataset, root, strict=strict, **kw), tmp_path / f"out{strict}")
        assert meta["counts"] == clean["counts"] and meta["stray"] == len(STRAYS) + 1
    listed = json.loads((tmp_path / "outTrue" / "skipped.json").read_text())
    assert sorted(Path(s["path"]).name for s in listed) == sorted([*STRAYS, "__MACOSX"])
    assert {s["reason"] for s in listed} == {"not an image"}


def test_split_sizes_default_to_all_of_a_real_dataset_and_cap_when_set(tmp_path, fmnist_root):
    """RSSCN7 as distributed holds 2,800 images (400 per class): with params.yaml's defaults (null)
    the fractions split all of it; a `*_size` caps its split and leaves the others; the embedded
    Fashion-MNIST keeps its 4000 / 1000 / 2000 (sized for the 15-minute default run)."""
    import yaml

    from tactic.data.layouts import fashion_mnist_index
    from tactic.data.prepare import choose_splits
    from tests.helpers import REPO

    root = fixtures.rsscn7(tmp_path / "raw", per_class=400, size=(8, 8))
    defaults = yaml.safe_load((REPO / "params.yaml").read_text())["prepare"]
    cfg = PrepareParams(**{**defaults, "dataset": "rsscn7", "root": str(root), "workers": 2})
    meta = prepare(cfg, tmp_path / "out")
    assert meta["counts"] == {"train": 2016, "val": 224, "test": 560}  # 70 / 8 / 20 % of 2,800
    from tactic.data.layouts import index

    ix = index(cfg)
    sizes = {k: len(v) for k, v in choose_splits(ix, cfg.model_copy(update={"train_size": 1000})).items()}
    assert sizes == {"train": 1000, "val": 224, "test": 560}
    embedded = PrepareParams(**{**defaults, "root": fmnist_root})
    assert {k: len(v) for k, v in choose_splits(fashion_mnist_index(embedded), embedded).items()} == {
        "train": 4000, "val": 1000, "test": 2000}


def test_datasets_check_reports_layout_counts_and_unreadable_images_and_writes_nothing(tmp_path, capsys):
    from tactic.data import check

    root = fixtures.rsscn7(tmp_path / "raw")
    _corrupt(root / "bField" / "b002.jpg")
    (root / "cIndustry" / "Thumbs.db").write_bytes(b"\x00")
    before = sorted(tmp_path.rglob("*"))
    assert check.main(["check", "rsscn7", str(root), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "rsscn7: 7 classes, 42 images, all decoded" in out and f"unreadable: {root / 'bField' / 'b002.jpg'}" in out
    assert f"not an image (left out): {root / 'cIndustry' / 'Thumbs.db'}" in out
    assert sorted(tmp_path.rglob("*")) == before  # nothing written
    (root / "aGrass").rename(root / "grass")
    assert check.main(["check", "rsscn7", str(root)]) == 1
    assert "expected layout" in capsys.readouterr().err


# A caller whose SIGTERM handler does not end the process (as one of a test process's did), then
# prepare on an image layout (so its decoding pool runs): at its first split, how each worker of the
# pool takes SIGTERM (its /proc status: caught by a Python handler, ignored, or the default, which ends
# it), once it has started (5 s at most). `Pool.terminate` relies on the default.
POOL_UNDER_A_HANDLER = """import os, signal, sys, time
from pathlib import Path
from tactic.config import PrepareParams
from tactic.data import fixtures, prepare as prep

signal.signal(signal.SIGTERM, lambda *_: None)
work = Path(sys.argv[1])
cfg = PrepareParams(dataset="rsscn7", root=str(fixtures.rsscn7(work / "raw")), size=32, workers=2)

def sigterm(pid):
    status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    bit = lambda key: int(status[key].split()[0], 16) >> (signal.SIGTERM - 1) & 1
    return "caught" if bit("SigCgt") else "ignored" if bit("SigIgn") else "default"

def first_split(folder, ix, positions, cfg, pool, skipped):
    pids = [w.pid for w in pool._pool]
    end = time.time() + 5
    while time.time() < end and any(sigterm(pid) != "default" for pid in pids):
        time.sleep(0.05)
    print(" ".join(sigterm(pid) for pid in pids), flush=True)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    os._exit(0)

prep._write_split = first_split
prep.prepare(cfg, work / "out")
"""


def test_the_decoding_pool_ends_on_sigterm_whatever_handler_its_caller_has(tmp_path):
    import subprocess
    import sys

    from tests.helpers import REPO

    out = subprocess.run([sys.executable, "-c", POOL_UNDER_A_HANDLER, str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["default", "default"], out.stdout + out.stderr[-2000:]
