"""Segmentation pieces: confusion-matrix scores, Dice and CE losses, segmenters, the canvas set."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tactic.data import fashion_mnist
from tactic.data.canvases import canvas_classes, canvas_layout, make_canvases
from tactic.losses import SegmentationLoss, TacticLoss, dice_loss
from tactic.metrics import confusion_matrix, segmentation_scores
from tactic.tasks.segmenters import build_segmenter

IGNORE = 255


# --- metrics -----------------------------------------------------------------------------------

# Pairs (true, predicted): (0,0) (0,1) (1,1) (1,1) (2,0), plus an ignored pixel predicted as 2.
TARGET = torch.tensor([[[0, 0, 1], [1, 2, IGNORE]]])
PRED = torch.tensor([[[0, 1, 1], [1, 0, 2]]])


def test_confusion_matrix_by_hand_ignores_255():
    conf = confusion_matrix(PRED, TARGET, 3)
    assert conf.dtype == torch.int64
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_scores_by_hand():
    s = segmentation_scores(confusion_matrix(PRED, TARGET, 3))
    assert s["pixel_accuracy"] == pytest.approx(3 / 5)
    # IoU = TP / (row + column - TP): class 0 1/(2+2-1), class 1 2/(2+3-2), class 2 0/(1+0-0).
    assert s["iou"] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert s["miou"] == pytest.approx(1 / 3)


def test_class_absent_from_truth_and_prediction_is_left_out_of_miou():
    s = segmentation_scores(confusion_matrix(PRED, TARGET, 4))
    assert math.isnan(s["iou"][3])
    assert s["miou"] == pytest.approx(1 / 3)
    # Predicted but never true: union > 0, IoU 0, and it does count in the mean.
    s = segmentation_scores(confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 0]), 4))
    assert s["iou"][3] == 0.0 and s["miou"] == pytest.approx((1 / 2 + 0) / 2)


def test_confusion_matrix_accumulates_and_rejects_bad_labels():
    a, b = confusion_matrix(PRED, TARGET, 3), confusion_matrix(PRED.flip(-1), TARGET, 3)
    assert torch.equal(a + b, confusion_matrix(torch.cat([PRED, PRED.flip(-1)]), torch.cat([TARGET, TARGET]), 3))
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0, IGNORE]), torch.tensor([0, 1]), 3)
    s = segmentation_scores(torch.zeros(3, 3, dtype=torch.int64))
    assert math.isnan(s["pixel_accuracy"]) and math.isnan(s["miou"])


# --- losses ------------------------------------------------------------------------------------

def _confident(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits (N, C, H, W) whose softmax is one-hot on `labels` to within e^-30."""
    return 30.0 * F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()


def test_dice_perfect_and_disjoint():
    target = torch.randint(0, 3, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    assert float(dice_loss(_confident(target, 3), target)) < 1e-6
    zeros = torch.zeros(1, 4, 4, dtype=torch.long)
    assert float(dice_loss(_confident(zeros + 1, 2), zeros, eps=0.0)) == pytest.approx(1.0, abs=1e-6)
    # With smoothing: each class scores eps / (16 + eps).
    assert float(dice_loss(_confident(zeros + 1, 2), zeros, eps=1.0)) == pytest.approx(16 / 17, abs=1e-6)


def test_dice_partial_by_hand():
    # Four pixels, true classes 0 0 1 1, softmax p(class 1) = 0.25 0.75 0.75 0.5.
    p1 = torch.tensor([0.25, 0.75, 0.75, 0.5])
    logits = torch.stack([torch.zeros(4), torch.log(p1 / (1 - p1))]).reshape(1, 2, 1, 4)
    target = torch.tensor([[[0, 0, 1, 1]]])
    # Class 0: |PG| = 0.75 + 0.25, |P| = 1.75, |G| = 2; class 1: |PG| = 0.75 + 0.5, |P| = 2.25, |G| = 2.
    d0, d1 = 2 * 1.0 / 3.75, 2 * 1.25 / 4.25
    assert float(dice_loss(logits, target, eps=0.0)) == pytest.approx(1 - (d0 + d1) / 2, abs=1e-6)
    d0, d1 = (2 * 1.0 + 1) / 4.75, (2 * 1.25 + 1) / 5.25
    assert float(dice_loss(logits, target, eps=1.0)) == pytest.approx(1 - (d0 + d1) / 2, abs=1e-6)


def test_dice_averages_over_classes_in_truth_or_prediction():
    target = torch.zeros(1, 1, 4, dtype=torch.long)
    pred = torch.tensor([[[0, 0, 0, 1]]])
    # Class 0: 2*3 / (3 + 4); class 1 (predicted, absent): 0; class 2 (nowhere): left out.
    assert float(dice_loss(_confident(pred, 3), target, eps=0.0)) == pytest.approx(1 - (6 / 7) / 2, abs=1e-6)


def test_ignored_pixels_change_neither_loss_nor_gradient():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, 6, generator=g)
    target = torch.randint(0, 4, (2, 6, 6), generator=g)
    ignored = target.clone()
    ignored[:, :, 4:] = IGNORE
    loss_fn = SegmentationLoss(gamma=0.7, class_weights=[1.0, 2.0, 0.5, 1.5])
    # Same pixels, with the ignored columns cut away: the same loss.
    cut = loss_fn(logits[..., :4], target[..., :4])
    for part, value in loss_fn(logits, ignored).items():
        assert float(value) == pytest.approx(float(cut[part]), rel=1e-5), part
    x = logits.clone().requires_grad_()
    loss_fn(x, ignored)["loss"].backward()
    assert x.grad[..., 4:].abs().max() == 0 and x.grad[..., :4].abs().max() > 0


def test_segmentation_loss_is_weighted_ce_plus_gamma_dice():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 5, 5, generator=g)
    target = torch.randint(0, 3, (2, 5, 5), generator=g)
    target[0, 0] = IGNORE
    weights = torch.tensor([0.2, 1.0, 3.0])
    parts = SegmentationLoss(gamma=2.0, class_weights=weights)(logits, target)
    expected_xe = F.cross_entropy(logits, target, weight=weights, ignore_index=IGNORE)
    assert float(parts["xe_loss"]) == pytest.approx(float(expected_xe), rel=1e-5)
    assert float(parts["xe_loss"]) != pytest.approx(float(F.cross_entropy(logits, target, ignore_index=IGNORE)), rel=1e-3)
    assert float(parts["dice_loss"]) == pytest.approx(float(dice_loss(logits, target)), rel=1e-6)
    assert float(parts["loss"]) == pytest.approx(float(parts["xe_loss"] + 2.0 * parts["dice_loss"]), rel=1e-6)


def test_all_pixels_ignored_gives_zero_not_nan():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    parts = SegmentationLoss(class_weights=[1.0, 2.0, 3.0])(logits, torch.full((1, 4, 4), IGNORE))
    assert all(float(v.detach()) == 0 for v in parts.values())
    parts["loss"].backward()
    assert torch.isfinite(logits.grad).all()


def test_tactic_loss_takes_a_task_loss():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 1, 4, 4, generator=g)
    seg = {"logits": torch.randn(2, 3, 4, 4, generator=g)}
    y = torch.randint(0, 3, (2, 4, 4), generator=g)
    parts = TacticLoss(alpha=0.5, task_loss=SegmentationLoss(gamma=1.0))(seg, x, y)
    assert set(parts) == {"xe_loss", "dice_loss", "task_loss", "loss"}
    assert float(parts["task_loss"]) == pytest.approx(float(parts["xe_loss"] + parts["dice_loss"]), rel=1e-6)
    assert float(parts["loss"]) == pytest.approx(0.5 * float(parts["task_loss"]), rel=1e-6)
    cls = {"logits": torch.randn(2, 5, generator=g)}
    labels = torch.tensor([1, 4])
    assert float(TacticLoss()(cls, x, labels)["task_loss"]) == pytest.approx(float(F.cross_entropy(cls["logits"], labels)))
    # Class weights are a buffer: they follow the loss module (and its owner) across devices and dtypes.
    assert "task_loss.class_weights" in dict(TacticLoss(task_loss=SegmentationLoss(class_weights=[1.0, 2.0])).named_buffers())


# --- networks ----------------------------------------------------------------------------------

def test_small_fcn_logits_at_input_size(tmp_path):
    net = build_segmenter("small-fcn", 1, 11, width=8)
    assert net(torch.rand(2, 1, 64, 64)).shape == (2, 11, 64, 64)
    assert net(torch.rand(1, 1, 48, 40)).shape == (1, 11, 48, 40)
    # A checkpoint with another class count: the features load, the head is rebuilt.
    other = build_segmenter("small-fcn", 1, 5, width=8)
    torch.save(other.state_dict(), tmp_path / "w.pt")
    loaded = build_segmenter("small-fcn", 1, 11, width=8, weights=str(tmp_path / "w.pt"))
    assert torch.equal(loaded.features[0][0].weight, other.features[0][0].weight)
    assert loaded.head.out_channels == 11
    with pytest.raises(FileNotFoundError):
        build_segmenter("small-fcn", 1, 11, weights=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="unknown"):
        build_segmenter("unet", 1, 11)


def test_fcn_resnet101_grey_and_rgb():
    net = build_segmenter("fcn_resnet101", 1, 19).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 1, 64, 64)).shape == (1, 19, 64, 64)
        assert build_segmenter("fcn_resnet101", 3, 4).eval()(torch.rand(1, 3, 32, 48)).shape == (1, 4, 32, 48)


def test_fcn_resnet101_loads_a_torchvision_checkpoint(tmp_path):
    from torchvision.models.segmentation import fcn_resnet101

    # torchvision's COCO checkpoint layout: 21 classes and an auxiliary head.
    source = fcn_resnet101(weights=None, weights_backbone=None, aux_loss=True, num_classes=21)
    torch.save(source.state_dict(), tmp_path / "coco.pth")
    net = build_segmenter("fcn_resnet101", 3, 19, weights=str(tmp_path / "coco.pth"))
    assert torch.equal(net.net.backbone.conv1.weight, source.backbone.conv1.weight)
    assert torch.equal(net.net.classifier[0].weight, source.classifier[0].weight)
    assert net.net.classifier[4].out_channels == 19 and net.net.aux_classifier is None


# --- the canvas set ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def items(fmnist_root):
    images, labels = fashion_mnist.load(fmnist_root, "test")
    return images[:500], labels[:500]


def _paint(images, labels, layout, size, threshold):
    """The canvases painted item by item, pixel by pixel: the reference for `make_canvases`."""
    count, slots = layout["index"].shape
    h, w = images.shape[1:3]
    canvases = np.zeros((count, size, size, images.shape[3]), np.uint8)
    masks = np.zeros((count, size, size), np.uint8)
    for n in range(count):
        for k in range(slots):
            i = layout["index"][n, k]
            if i < 0:
                continue
            y, x = layout["y"][n, k], layout["x"][n, k]
            for r in range(h):
                for c in range(w):
                    if images[i, r, c].max() > threshold:
                        canvases[n, y + r, x + c] = images[i, r, c]
                        masks[n, y + r, x + c] = 1 + labels[i]
    return canvases, masks


def test_canvases_are_deterministic(items):
    a = make_canvases(*items, 20, seed=3)
    b = make_canvases(*items, 20, seed=3)
    c = make_canvases(*items, 20, seed=4)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("threshold", [0, 60])
def test_canvas_labels_match_pixels(items, threshold):
    images, labels = items
    canvases, masks = make_canvases(images, labels, 12, size=64, items=(2, 4), seed=7, threshold=threshold)
    assert canvases.shape == (12, 64, 64, 1) and masks.shape == (12, 64, 64)
    assert canvases.dtype == masks.dtype == np.uint8
    # Background exactly where no item shows a pixel above the threshold.
    assert np.array_equal(masks == 0, canvases[..., 0] <= threshold)
    layout = canvas_layout(len(images), 12, 64, (28, 28), (2, 4), seed=7)
    counts = (layout["index"] >= 0).sum(1)
    assert counts.min() >= 2 and counts.max() <= 4
    for n in range(12):
        placed = {1 + int(labels[i]) for i in layout["index"][n] if i >= 0}
        assert set(np.unique(masks[n])) - {0} <= placed
    # Every pixel and label is the one of the last item whose foreground covers it.
    ref_canvases, ref_masks = _paint(images, labels, layout, 64, threshold)
    assert np.array_equal(canvases, ref_canvases) and np.array_equal(masks, ref_masks)


def test_canvases_with_colour_items_and_names():
    # Foreground is judged on the brightest channel: a pure-blue item counts.
    item = np.zeros((1, 4, 4, 3), np.uint8)
    item[0, 1:3, 1:3, 2] = 200
    canvases, masks = make_canvases(item, np.array([5]), 3, size=8, items=(1, 1), seed=0)
    assert (masks == 6).sum(axis=(1, 2)).tolist() == [4, 4, 4]
    assert np.array_equal(canvases[..., 2] == 200, masks == 6)
    assert canvas_classes(["a", "b"]) == ["background", "a", "b"]
    with pytest.raises(ValueError, match="fit"):
        make_canvases(item, np.array([0]), 1, size=3)


def test_canvases_are_mostly_items_not_background(items):
    # Items cover a good share of each canvas: a segmentation set, not mostly background.
    # (How fast canvases are made is measured in benchmarks/canvases.py.)
    canvases, masks = make_canvases(*items, 300, seed=0)
    assert 0.1 < (masks > 0).mean() < 0.6
