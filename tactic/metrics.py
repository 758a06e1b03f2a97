"""Metrics: top-k accuracy, PSNR, and BD-accuracy between rate-accuracy curves."""
from __future__ import annotations

import numpy as np
import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    ks = [k for k in ks if k <= logits.shape[1]]
    top = logits.topk(max(ks), dim=1).indices
    hit = top == labels[:, None]
    return {k: int(hit[:, :k].any(dim=1).sum()) for k in ks}


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0, 1]; identical images give +inf."""
    mse = (x_hat.clamp(0, 1) - x).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse)


def bd_accuracy(rate_a, acc_a, rate_b, acc_b, samples: int = 1000) -> float:
    """Mean accuracy of curve B minus curve A over their overlapping log-rate range.

    Bjontegaard's delta, with accuracy in place of PSNR: each curve is interpolated piecewise
    linearly in log10(bpp) (robust where a cubic fit of few noisy points overshoots) and the
    difference is averaged over the common interval. Positive means B is more accurate at equal rate.
    Raises ValueError when the rate ranges do not overlap.
    """
    def curve(rate, acc):
        rate, acc = np.asarray(rate, float), np.asarray(acc, float)
        if len(rate) < 2 or (rate <= 0).any():
            raise ValueError("a curve needs at least two points with positive rate")
        order = np.argsort(rate)
        return np.log10(rate[order]), acc[order]

    (ra, aa), (rb, ab) = curve(rate_a, acc_a), curve(rate_b, acc_b)
    lo, hi = max(ra[0], rb[0]), min(ra[-1], rb[-1])
    if hi <= lo:
        raise ValueError(f"rate ranges do not overlap: [{10**ra[0]:.3g}, {10**ra[-1]:.3g}] and [{10**rb[0]:.3g}, {10**rb[-1]:.3g}] bpp")
    grid = np.linspace(lo, hi, samples)
    return float(np.mean(np.interp(grid, rb, ab) - np.interp(grid, ra, aa)))
