"""Metrics: top-k accuracy, PSNR, BD-accuracy and BD-rate between rate-accuracy curves, matched-rate
comparisons, and segmentation scores.

Segmentation is scored from one confusion matrix summed over the whole test split:

    conf = sum(confusion_matrix(logits.argmax(1), y, num_classes) for logits, y in batches)
    scores = segmentation_scores(conf)  # pixel_accuracy, miou, iou (per class)
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

# The test metrics of a run: what `evaluate` writes into results/eval.json and into each training
# run's MLflow run, what the report aggregates over seeds and what `tactic compare` reads back.
RATE_METRICS = ("bpp", "bpp_estimated", "bpp_file", "psnr", "msssim")
TEST_METRICS = {"classification": ("accuracy", "top5", *RATE_METRICS),  # accuracy: top-1
                "segmentation": ("accuracy", "miou", *RATE_METRICS)}   # accuracy: pixel accuracy
ALL_TEST_METRICS = ("accuracy", "top5", "miou", *RATE_METRICS)
# In files `accuracy` is each task's headline score, so one report reads both tasks; in MLflow, where
# runs of both tasks sit side by side, it is logged under the name of what it is.
TRACKED_NAMES = {"classification": {"accuracy": "top1"}, "segmentation": {"accuracy": "pixel_accuracy"}}


def tracked_names(metrics: dict, task: str) -> dict:
    """`metrics` as MLflow names them for `task`: `accuracy` -> `top1`, `val_accuracy` -> `val_top1`, ..."""
    rename = TRACKED_NAMES[task]

    def name(key):
        head, _, last = key.rpartition("_")
        return f"{head}_{rename[last]}".lstrip("_") if last in rename else key

    return {name(k): v for k, v in metrics.items()}


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    ks = [k for k in ks if k <= logits.shape[1]]
    top = logits.topk(max(ks), dim=1).indices
    hit = top == labels[:, None]
    return {k: int(hit[:, :k].any(dim=1).sum()) for k in ks}


def _as_8bit(x: torch.Tensor) -> torch.Tensor:
    return (x.float().clamp(0, 1) * 255).round()


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1], on their 8-bit values as stored or shown (CompressAI's
    `compute_metrics`: both rounded to 0..255, peak 255); identical images give +inf."""
    mse = (_as_8bit(x_hat) - _as_8bit(x)).pow(2).flatten(1).mean(1)
    return 20 * torch.log10(torch.tensor(255.0)) - 10 * torch.log10(mse)


MS_SSIM_MIN_SIDE = 161  # five scales of an 11-pixel window: (11 - 1) * 2**4 + 1


def ms_ssim(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """Per-image MS-SSIM on 8-bit values (CompressAI's: pytorch_msssim, five scales, data range 255);
    None for images under MS_SSIM_MIN_SIDE pixels a side, where its coarsest scale has no window."""
    if min(x.shape[-2:]) < MS_SSIM_MIN_SIDE:
        return None
    from pytorch_msssim import ms_ssim as _ms_ssim

    return _ms_ssim(_as_8bit(x_hat), _as_8bit(x), data_range=255, size_average=False)


def _curve(rate, acc) -> tuple[np.ndarray, np.ndarray]:
    """(log10 rate, accuracy) sorted by rate; at least two points of positive rate."""
    rate, acc = np.asarray(rate, float), np.asarray(acc, float)
    if len(rate) < 2 or (rate <= 0).any():
        raise ValueError("a curve needs at least two points with positive rate")
    order = np.argsort(rate)
    return np.log10(rate[order]), acc[order]


BD_METHODS = ("linear", "pchip")


def bd_accuracy(rate_a, acc_a, rate_b, acc_b, samples: int = 1000, method: str = "linear") -> float:
    """Mean accuracy of curve B minus curve A over their overlapping log-rate range.

    Bjontegaard's delta, with accuracy in place of PSNR: each curve is interpolated in log10(bpp) and
    the difference is averaged over the common interval. `linear`: piecewise linear (robust where a
    cubic fit of few noisy points overshoots); `pchip`: piecewise cubic Hermite (monotone between
    points, never overshooting them), the interpolation of the field's current BD tools (JVET CTC).
    Positive means B is more accurate at equal rate. Raises ValueError when the rate ranges do not overlap.
    """
    (ra, aa), (rb, ab) = _curve(rate_a, acc_a), _curve(rate_b, acc_b)
    lo, hi = max(ra[0], rb[0]), min(ra[-1], rb[-1])
    if hi <= lo:
        raise ValueError(f"rate ranges do not overlap: [{10**ra[0]:.3g}, {10**ra[-1]:.3g}] and [{10**rb[0]:.3g}, {10**rb[-1]:.3g}] bpp")
    if method == "pchip":
        from scipy.interpolate import PchipInterpolator

        fa, fb = (PchipInterpolator(*_distinct(r, a)) for r, a in ((ra, aa), (rb, ab)))
        return float((fb.integrate(lo, hi) - fa.integrate(lo, hi)) / (hi - lo))
    grid = np.linspace(lo, hi, samples)
    return float(np.mean(np.interp(grid, rb, ab) - np.interp(grid, ra, aa)))


def _distinct(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points with equal x merged into their mean (a cubic interpolant needs strictly increasing x)."""
    xs, inverse = np.unique(x, return_inverse=True)
    if len(xs) < 2:
        raise ValueError("a curve needs at least two distinct rates")
    return xs, np.bincount(inverse, weights=y) / np.bincount(inverse)


def _first_crossing(log_rate: np.ndarray, acc: np.ndarray, target: float) -> float | None:
    """log10 of the lowest rate at which the piecewise-linear curve reaches `target`, or None.

    Defined for curves that are not monotone (accuracy may dip as the rate grows): it is where the
    curve first gets there, which is what a user choosing an operating point wants to know."""
    if acc[0] >= target:
        return float(log_rate[0])
    for i in range(len(acc) - 1):
        if acc[i + 1] >= target:  # acc[i] < target <= acc[i + 1]
            t = (target - acc[i]) / (acc[i + 1] - acc[i])
            return float(log_rate[i] + t * (log_rate[i + 1] - log_rate[i]))
    return None


def bd_rate(rate_a, acc_a, rate_b, acc_b, samples: int = 1000, method: str = "linear") -> float:
    """Rate change of curve B against curve A at equal accuracy, in percent (negative: B needs fewer bits).

    Bjontegaard's BD-rate with accuracy in place of PSNR: for every accuracy both curves reach, the
    log rate at which each reaches it; the mean log-rate difference over the overlapping accuracy
    range, as a percentage. A curve's range runs from the accuracy at its lowest rate to its best.
    `linear`: the lowest rate at which the piecewise-linear curve first reaches the accuracy (defined
    for curves that are not monotone, see `_first_crossing`); `pchip`: log rate as a piecewise cubic
    Hermite function of accuracy, as Bjontegaard's tools do, which needs accuracy rising with rate.
    Raises ValueError when the accuracy ranges do not overlap, or (pchip) a curve is not monotone.
    """
    (ra, aa), (rb, ab) = _curve(rate_a, acc_a), _curve(rate_b, acc_b)
    lo, hi = max(aa[0], ab[0]), min(aa.max(), ab.max())
    if hi <= lo:
        raise ValueError(f"score ranges (accuracy, mIoU) do not overlap: [{aa[0]:.3g}, {aa.max():.3g}] and [{ab[0]:.3g}, {ab.max():.3g}]")
    if method == "pchip":
        from scipy.interpolate import PchipInterpolator

        if (np.diff(aa) <= 0).any() or (np.diff(ab) <= 0).any():
            raise ValueError("pchip BD-rate needs the score rising with rate on both curves; one is not monotone")
        fa, fb = PchipInterpolator(aa, ra), PchipInterpolator(ab, rb)
        return float(100 * (10 ** ((fb.integrate(lo, hi) - fa.integrate(lo, hi)) / (hi - lo)) - 1))
    grid = np.linspace(lo, hi, samples)
    diff = [_first_crossing(rb, ab, a) - _first_crossing(ra, aa, a) for a in grid]
    return float(100 * (10 ** np.mean(diff) - 1))


def rate_at_accuracy(rate, acc, target: float) -> float | None:
    """The lowest rate (bpp) at which the curve reaches `target` accuracy; None if it never does."""
    lr, a = _curve(rate, acc)
    hit = _first_crossing(lr, a, target)
    return None if hit is None else float(10**hit)


def accuracy_at_rate(rate, acc, budget: float) -> float | None:
    """The best accuracy the curve reaches at a rate of at most `budget` bpp (interpolated in
    log10(bpp) between its points); None if its lowest rate is above the budget."""
    lr, a = _curve(rate, acc)
    lb = np.log10(budget)
    if lb < lr[0]:
        return None
    inside = list(a[lr <= lb])
    if lb < lr[-1]:
        inside.append(float(np.interp(lb, lr, a)))
    return float(max(inside))


def accuracy_read_at(rate, acc, at: float) -> float:
    """The curve's accuracy at `at` bpp, interpolated in log10(bpp) between the two points that bracket
    it: a reference curve read at another mode's rate, for a gain at matched rate. Raises ValueError
    outside the curve's rates (no extrapolation)."""
    lr, a = _curve(rate, acc)
    la = np.log10(at)
    if not lr[0] <= la <= lr[-1]:
        raise ValueError(f"{at:.3g} bpp is outside the reference's rates [{10**lr[0]:.3g}, {10**lr[-1]:.3g}]")
    return float(np.interp(la, lr, a))


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """Pixel counts (num_classes, num_classes), int64, on the inputs' device: row = true class, column = predicted.

    `pred` and `target` are class maps of the same shape (e.g. (N, H, W)); pixels whose target is
    `ignore_index` are not counted. Raises ValueError on any other label outside [0, num_classes).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    valid = target != ignore_index
    pred, target = pred[valid].long(), target[valid].long()
    # bincount would silently fold an out-of-range label into a neighbouring cell.
    if ((target < 0) | (target >= num_classes) | (pred < 0) | (pred >= num_classes)).any():
        raise ValueError(f"labels outside [0, {num_classes}) other than ignore_index={ignore_index}")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def segmentation_scores(conf) -> dict:
    """Pixel accuracy, mean IoU and per-class IoU from a confusion matrix (rows = true class).

    IoU_c = TP / (TP + FP + FN). A class absent from both ground truth and prediction (zero union)
    has no IoU: it is NaN in `iou` and left out of `miou`, as in the Cityscapes evaluation script,
    which averages over classes with a non-zero union. Empty matrices give NaN scores.
    """
    conf = np.asarray(conf.cpu() if isinstance(conf, torch.Tensor) else conf, dtype=np.float64)
    tp, total = np.diag(conf), conf.sum()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = np.full(len(tp), np.nan)
    np.divide(tp, union, out=iou, where=union > 0)
    return {
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
        "miou": float(iou[union > 0].mean()) if (union > 0).any() else float("nan"),
        "iou": iou.tolist(),
    }


def at_chance(accuracy: float, classes: int, n: int) -> bool:
    """Whether a top-1 accuracy over `n` images is not above chance (1 / classes) by three standard
    errors: a collapsed codec or a task network that never learned."""
    chance = 1 / classes
    return accuracy <= chance + 3 * (chance * (1 - chance) / n) ** 0.5


class TaskScores:
    """Accuracy summed over batches: top-k for classification; for segmentation a confusion matrix
    over the whole split, giving pixel accuracy (as `accuracy`) and mean IoU (`miou`)."""

    def __init__(self, ignore_index: int = 255):
        self.ignore_index, self.sums, self.n, self.conf, self.classes = ignore_index, defaultdict(float), 0, None, None

    def add(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        if logits.dim() == 4:
            conf = confusion_matrix(logits.argmax(1), y, logits.shape[1], self.ignore_index)
            self.conf = conf if self.conf is None else self.conf + conf
        else:
            self.classes = logits.shape[1]
            for k, c in topk_correct(logits, y).items():
                self.sums[f"top{k}"] += c
            self.n += len(y)

    def result(self) -> dict:
        if self.conf is not None:
            scores = segmentation_scores(self.conf)
            iou = [None if v != v else v for v in scores["iou"]]  # NaN (class never seen) -> null in JSON
            return {"accuracy": scores["pixel_accuracy"], "miou": scores["miou"], "iou": iou}
        out = {"accuracy": self.sums["top1"] / self.n, "num_classes": self.classes} if self.n else {}
        if "top5" in self.sums:
            out["top5"] = self.sums["top5"] / self.n
        return out
