"""Turn a dataset, as distributed, into the prepared form (see `tactic.data.prepared`)."""
from __future__ import annotations

from pathlib import Path

from tactic.config import PrepareParams
from tactic.data import fashion_mnist
from tactic.data.prepared import stratified_split, write_prepared


def prepare(cfg: PrepareParams, out: str | Path) -> dict:
    """Read `cfg.dataset` from `cfg.root`, split it per `cfg`, write it to `out`; returns meta.json's content."""
    if cfg.dataset != "fashion-mnist":
        raise ValueError(f"prepare.dataset: unknown {cfg.dataset!r}")
    images, labels = fashion_mnist.load(cfg.root, "train")
    test_images, test_labels = fashion_mnist.load(cfg.root, "test")
    for key, want, have in (("prepare.train_size + prepare.val_size", cfg.train_size + cfg.val_size, len(labels)),
                            ("prepare.test_size", cfg.test_size, len(test_labels))):
        if want > have:
            raise ValueError(f"{key}: asks for {want} images, the dataset has {have}")
    train_idx, val_idx = stratified_split(labels, [cfg.train_size, cfg.val_size], cfg.split_seed)
    (test_idx,) = stratified_split(test_labels, [cfg.test_size], cfg.split_seed)
    meta = {"dataset": cfg.dataset, "classes": fashion_mnist.CLASSES, "channels": 1, "size": list(images.shape[1:3]),
            "split_seed": cfg.split_seed}
    return write_prepared(out, {"train": (images[train_idx], labels[train_idx]), "val": (images[val_idx], labels[val_idx]),
                                "test": (test_images[test_idx], test_labels[test_idx])}, meta)
