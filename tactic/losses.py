"""The TACTIC objective, L = lmbda_d * L_D + alpha * L_T + beta * L_R, returned part by part."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bpp(likelihoods: dict, num_pixels: int) -> torch.Tensor:
    """Estimated bits per pixel: the information content of the latents under the entropy model."""
    return sum(torch.log(l).sum() for l in likelihoods.values()) / (-math.log(2) * num_pixels)


class TacticLoss(torch.nn.Module):
    """Weighted sum of distortion (MSE on [0, 1] pixels), task loss (cross-entropy) and rate (bpp).

    A part whose weight is 0 is still computed when its inputs exist, so every part can be logged.
    """

    def __init__(self, lmbda_d: float = 1.0, alpha: float = 1.0, beta: float = 0.0):
        super().__init__()
        self.lmbda_d, self.alpha, self.beta = lmbda_d, alpha, beta

    def forward(self, out: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
        parts, loss = {}, x.new_zeros(())
        if "x_hat" in out:
            parts["mse_loss"] = F.mse_loss(out["x_hat"], x)
            parts["bpp_loss"] = bpp(out["likelihoods"], x.shape[0] * x.shape[2] * x.shape[3])
            loss = loss + self.lmbda_d * parts["mse_loss"] + self.beta * parts["bpp_loss"]
        if "logits" in out:
            parts["task_loss"] = F.cross_entropy(out["logits"], y)
            loss = loss + self.alpha * parts["task_loss"]
        parts["loss"] = loss
        return parts
