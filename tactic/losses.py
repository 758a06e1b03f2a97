"""The TACTIC objective, L = lmbda_d * L_D + alpha * L_T + beta * L_R, returned part by part.

L_T is cross-entropy for classification; for segmentation pass `task_loss=SegmentationLoss(...)`
(weighted cross-entropy + gamma * Dice), whose parts are logged too:

    loss_fn = TacticLoss(lmbda_d=1.0, alpha=1.0, beta=0.01, task_loss=SegmentationLoss(gamma=1.0))
    parts = loss_fn(system(x), x, y)  # mse_loss, bpp_loss, xe_loss, dice_loss, task_loss, loss
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F


def bpp(likelihoods: dict, num_pixels: int) -> torch.Tensor:
    """Estimated bits per pixel: the information content of the latents under the entropy model."""
    return sum(torch.log(l).sum() for l in likelihoods.values()) / (-math.log(2) * num_pixels)


class TacticLoss(torch.nn.Module):
    """Weighted sum of distortion (MSE on [0, 1] pixels), task loss and rate (bpp).

    A part whose weight is 0 is still computed when its inputs exist, so every part can be logged.
    `task_loss(logits, y)` defaults to cross-entropy; it may return a tensor or a dict of parts
    with the total under "loss" (as `SegmentationLoss` does), whose other parts are logged as they are.
    """

    def __init__(self, lmbda_d: float = 1.0, alpha: float = 1.0, beta: float = 0.0,
                 task_loss: Optional[Callable] = None):
        super().__init__()
        self.lmbda_d, self.alpha, self.beta = lmbda_d, alpha, beta
        # A module (e.g. SegmentationLoss with class weights) is registered, so .to(device) moves its buffers.
        self.task_loss = task_loss if task_loss is not None else F.cross_entropy

    def forward(self, out: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
        parts, loss = {}, x.new_zeros(())
        if "likelihoods" in out:
            parts["bpp_loss"] = bpp(out["likelihoods"], x.shape[0] * x.shape[2] * x.shape[3])
            loss = loss + self.beta * parts["bpp_loss"]
        if "x_hat" in out:  # absent when a compressed-domain system skips the pixel decoder
            parts["mse_loss"] = F.mse_loss(out["x_hat"], x)
            loss = loss + self.lmbda_d * parts["mse_loss"]
        if "logits" in out:
            task = self.task_loss(out["logits"], y)
            if isinstance(task, dict):
                parts.update((k, v) for k, v in task.items() if k != "loss")
                task = task["loss"]
            parts["task_loss"] = task
            loss = loss + self.alpha * parts["task_loss"]
        parts["loss"] = loss
        return parts


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255, eps: float = 1.0) -> torch.Tensor:
    """Soft multi-class Dice loss, 1 - mean_c (2 |P_c G_c| + eps) / (|P_c| + |G_c| + eps).

    P_c is the softmax probability of class c, G_c the one-hot target; sums run over the whole
    batch's non-ignored pixels. The mean is over classes present in the target or in the argmax
    prediction (the convention of `segmentation_scores`: classes with a non-zero union): averaging
    over all classes would let the many classes absent from a batch dominate, each scoring ~0 from
    a little stray probability mass, while a class predicted but absent still counts as an error.
    Returns 0 when every pixel is ignored.

    Args:
        logits: (N, C, H, W) class scores.
        target: (N, H, W) class indices in [0, C) or `ignore_index`.
        eps: smoothing added to numerator and denominator; softens the loss on classes with few pixels.
    """
    valid = (target != ignore_index).unsqueeze(1).to(logits.dtype)
    probs = logits.softmax(1) * valid
    onehot = torch.zeros_like(probs).scatter_(1, target.unsqueeze(1).where(valid.bool(), 0), valid)
    predicted = torch.zeros_like(probs).scatter_(1, logits.argmax(1, keepdim=True), valid)
    dims = (0, 2, 3)
    inter, p_sum, g_sum = (probs * onehot).sum(dims), probs.sum(dims), onehot.sum(dims)
    present = ((g_sum + predicted.sum(dims)) > 0).to(logits.dtype)
    dice = (2 * inter + eps) / (p_sum + g_sum + eps)
    # 1 - mean over present classes, written without a data-dependent branch (no GPU sync).
    return (present * (1 - dice)).sum() / present.sum().clamp(min=1)


class SegmentationLoss(torch.nn.Module):
    """The TACTIC segmentation task loss, L_T = weighted cross-entropy + gamma * Dice.

    Pixels labelled `ignore_index` (Cityscapes: 255) count in neither part. Returns a dict with
    `xe_loss`, `dice_loss` and their sum `loss`, so each part can be logged.

    Args:
        gamma: weight of the Dice part (the TACTIC paper found CE + Dice best).
        class_weights: per-class cross-entropy weights (length C), or None for equal weights.
        ignore_index: label of pixels without ground truth.
        eps: Dice smoothing, see `dice_loss`.
    """

    def __init__(self, gamma: float = 1.0, class_weights=None, ignore_index: int = 255, eps: float = 1.0):
        super().__init__()
        self.gamma, self.ignore_index, self.eps = gamma, ignore_index, eps
        weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> dict:
        # F.cross_entropy's weighted mean, sum(w_y * l) / sum(w_y), made 0 rather than NaN when every pixel is ignored.
        valid = target != self.ignore_index
        xe = F.cross_entropy(logits, target, weight=self.class_weights, ignore_index=self.ignore_index, reduction="sum")
        w = valid.to(logits.dtype) if self.class_weights is None else self.class_weights[target.where(valid, 0)] * valid
        xe = xe / w.sum().clamp(min=torch.finfo(logits.dtype).tiny)
        dice = dice_loss(logits, target, self.ignore_index, self.eps)
        return {"xe_loss": xe, "dice_loss": dice, "loss": xe + self.gamma * dice}
