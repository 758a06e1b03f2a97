import json

import numpy as np
import pytest

from tactic.config import PrepareParams
from tactic.data import batches, fashion_mnist
from tactic.data.prepare import prepare
from tactic.data.prepared import load_split, read_meta, stratified_split


def test_stratified_split():
    labels = np.repeat(np.arange(5), [100, 200, 300, 200, 200])
    a, b = stratified_split(labels, [100, 50], seed=3)
    assert len(set(a) & set(b)) == 0
    assert np.bincount(labels[a], minlength=5).tolist() == [10, 20, 30, 20, 20]
    assert np.array_equal(a, stratified_split(labels, [100, 50], seed=3)[0])
    assert not np.array_equal(a, stratified_split(labels, [100, 50], seed=4)[0])
    with pytest.raises(ValueError, match="only 1000 available"):
        stratified_split(labels, [900, 200], 0)


def test_missing_data_names_layout_and_install(tmp_path):
    with pytest.raises(fashion_mnist.DatasetError) as err:
        fashion_mnist.load(tmp_path, "train")
    msg = str(err.value)
    assert "train-images-idx3-ubyte.gz" in msg and "{train,t10k}" in msg and "apt-get install dataset-fashion-mnist" in msg


def test_corrupt_idx_named(tmp_path):
    for f in fashion_mnist.FILES["train"]:
        (tmp_path / f).write_bytes(b"not gzip")
    with pytest.raises(fashion_mnist.DatasetError, match="train-images-idx3-ubyte.gz: unreadable"):
        fashion_mnist.load(tmp_path, "train")


def test_prepare_is_byte_identical_and_stratified(tmp_path, fmnist_root):
    cfg = PrepareParams(root=fmnist_root, train_size=200, val_size=50, test_size=100)
    m1 = prepare(cfg, tmp_path / "a")
    prepare(cfg, tmp_path / "b")
    assert (tmp_path / "a/manifest.json").read_text() == (tmp_path / "b/manifest.json").read_text()
    assert m1["counts"] == {"train": 200, "val": 50, "test": 100}
    train = load_split(tmp_path / "a", "train")
    assert train.images.shape == (200, 28, 28, 1) and train.images.dtype == np.uint8
    assert np.bincount(train.labels).tolist() == [20] * 10
    assert read_meta(tmp_path / "a")["classes"][0] == "T-shirt/top"
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind
    files = json.loads((tmp_path / "a/manifest.json").read_text())
    assert "train/images.npy" in files


def test_split_sizes_are_caps_a_smaller_split_is_kept_whole(tmp_path, fmnist_root):
    meta = prepare(PrepareParams(root=fmnist_root, train_size=10, val_size=10, test_size=20000), tmp_path / "p")
    assert meta["counts"] == {"train": 10, "val": 10, "test": 10000}  # Fashion-MNIST's whole test split


def test_batches_cover_the_split_in_a_seeded_order(prepared):
    split = load_split(prepared, "val")
    ys = [y for _, y in batches(split, 32, "cpu", shuffle_seed=1)]
    assert sum(len(y) for y in ys) == len(split)
    again = [y for _, y in batches(split, 32, "cpu", shuffle_seed=1)]
    assert all((a == b).all() for a, b in zip(ys, again))
    x, _ = next(batches(split, 8, "cpu"))
    assert x.shape == (8, 1, 28, 28) and 0 <= x.min() and x.max() <= 1
