"""The training loop shared by every mode: epochs over the prepared split, an MLflow metric per
epoch, a checkpoint after each epoch but the last (the model itself is saved then), and resumption
from that checkpoint after an interruption."""
from __future__ import annotations

import hashlib
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from tactic.data import batches, num_batches
from tactic.data.prepared import Split
from tactic.io import save_torch
from tactic.losses import TacticLoss
from tactic.metrics import TaskScores, psnr
from tactic.experiment.system import System


def fingerprint(*parts) -> str:
    """Identifies a training configuration, so a checkpoint is resumed only by the same one."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or gradient: stopped before any checkpoint holds it."""


# What a user calls each loss part in an error message.
_PART_NAMES = {"mse_loss": "mse", "task_loss": "task", "bpp_loss": "bpp", "xe_loss": "task (cross-entropy)",
               "dice_loss": "task (Dice)"}


def _check_finite(parts: dict, grad_norm: torch.Tensor, name: str, epoch: int, step: int) -> None:
    """Raise DivergenceError naming the run, epoch, step and the loss part that is not finite.

    One check per step on values the loop has already computed (the loss and the total gradient
    norm), so a divergence stops training within the step it happens."""
    bad = {k: float(v.detach()) for k, v in parts.items() if k != "loss" and not torch.isfinite(v.detach()).all()}
    if bad or not torch.isfinite(parts["loss"].detach()) or not torch.isfinite(grad_norm):
        what = ", ".join(f"{_PART_NAMES.get(k, k)} loss = {v}" for k, v in bad.items()) or (
            f"loss = {float(parts['loss'])}" if not torch.isfinite(parts["loss"].detach()) else f"gradient norm = {float(grad_norm)}")
        raise DivergenceError(f"{name}: training diverged at epoch {epoch + 1}, step {step + 1}: {what} "
                              "(try a lower learning rate: train.lr, pretrain.lr, train.codec_lr)")


# Measured (benchmarks/train_step.py, 2-core CPU): NHWC makes a training step of the narrow
# networks (the TACTIC codec, the small CNN, the embedded hyperprior: at most 64 channels) 1.2-1.6x
# faster; those of the ResNets (up to 2048 channels) 0.89-1.01x, and at 128-320 channels 0.98-1.02x.
NHWC_MAX_CHANNELS = 64


def use_nhwc(system: torch.nn.Module) -> bool:
    """Whether `fit` trains `system` in NHWC (channels_last): where oneDNN's NHWC convolutions measured faster."""
    widths = [m.out_channels for m in system.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    return bool(widths) and max(widths) <= NHWC_MAX_CHANNELS


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """Images and feature maps in NHWC; the values are the same, only where they sit in memory changes."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def lr_factor(schedule: str, done: int, total: int) -> float:
    """The share of its initial learning rate a group gets after `done` of `total` steps."""
    return 0.5 * (1 + math.cos(math.pi * done / total)) if schedule == "cosine" else 1.0


def make_optimizers(system: System, lr: float, codec_lr: Optional[float] = None, aux_lr: float = 1e-3):
    """Adam on the networks (the codec at its own rate) and, when the codec learns, a second Adam on
    the entropy model's quantiles driven by `aux_loss()` (CompressAI's recipe)."""
    groups, aux = [], None
    if system.task is not None:
        groups.append({"params": list(system.task.parameters()), "lr": lr})
    if system.codec is not None and not system.codec_frozen:
        named = dict(system.codec.named_parameters())
        groups.append({"params": [v for k, v in named.items() if not k.endswith(".quantiles")], "lr": codec_lr or lr})
        aux = torch.optim.Adam([v for k, v in named.items() if k.endswith(".quantiles")], lr=aux_lr)
    opt = torch.optim.Adam(groups)
    for g in opt.param_groups:  # what a schedule scales (kept in the optimiser's state, so resuming keeps it)
        g["initial_lr"] = g["lr"]
    return opt, aux


@torch.no_grad()
def validate(system: System, loss_fn: TacticLoss, split: Split, batch_size: int, device, limit_batches=None,
             nhwc: bool = False) -> dict:
    """Loss parts, accuracy (mIoU too for segmentation) and PSNR on what the test split will show the
    task network: the codec in inference mode (rounded latents, the reconstruction a bitstream
    decodes to; estimated bpp), or the cached codes a mode with a fixed codec or JPEG trains on."""
    system.eval()
    sums, n = defaultdict(float), 0
    scores = TaskScores(getattr(loss_fn.task_loss, "ignore_index", 255))
    for x, y in batches(split, batch_size, device, limit_batches=limit_batches):
        x = channels_last(x) if nhwc else x
        out = system(x)
        for k, v in loss_fn(out, x, y).items():
            sums[k] += float(v) * len(x)
        if "logits" in out:
            scores.add(out["logits"], y)
        if "x_hat" in out:
            sums["psnr"] += float(psnr(out["x_hat"], x).clamp(max=100).sum())
        n += len(x)
    metrics = {f"val_{k}": v / n for k, v in sums.items()}
    if system.task is not None:
        metrics.update({f"val_{k}": v for k, v in scores.result().items() if k in ("accuracy", "miou")})
    return metrics


def fit(
    system: System,
    loss_fn: TacticLoss,
    optimizers: tuple,
    train: Split,
    val: Split,
    cfg,  # OptimParams: epochs, batch_size, limit_batches
    seed: int,
    device,
    checkpoint: Path,
    config_id: str,
    log: Callable[[dict, int], None] = lambda metrics, epoch: None,
    state: Optional[dict] = None,
    extra: Optional[dict] = None,
    name: str = "training",
) -> list[dict]:
    """Train for `cfg.epochs` from scratch, or from `state`, a checkpoint read by `load_checkpoint`.

    `extra` (e.g. the MLflow run id) is stored in every checkpoint written. A non-finite loss or
    gradient raises DivergenceError (naming `name`, the epoch, step and loss part) before the step's
    update, so no checkpoint ever holds non-finite weights.
    """
    opt, aux_opt = optimizers
    history, start = [], 0
    nhwc = use_nhwc(system)
    if nhwc:  # in place (the optimisers keep their parameters), before any state is loaded
        system.to(memory_format=torch.channels_last)
    if state is not None:
        system.load_state_dict(state["system"])
        opt.load_state_dict(state["opt"])
        if aux_opt is not None:
            aux_opt.load_state_dict(state["aux_opt"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():  # the rate term's noise on a GPU draws from these
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        history, start = state["history"], state["epoch"] + 1
    total = num_batches(train, cfg.batch_size, cfg.limit_batches)
    for epoch in range(start, cfg.epochs):
        system.train()
        sums, n = defaultdict(float), 0
        # The shuffle depends on (seed, epoch) only, so a resumed run sees the batches it would have seen.
        it = batches(train, cfg.batch_size, device, seed * 10_000 + epoch, cfg.limit_batches)
        params = [q for g in opt.param_groups for q in g["params"]]
        for step, (x, y) in enumerate(tqdm(it, total=total, desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr,
                                           disable=None, leave=False)):
            # Set from (epoch, step) alone, so a resumed run continues the schedule where it stopped.
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * lr_factor(cfg.lr_schedule, epoch * total + step, cfg.epochs * total)
            x = channels_last(x) if nhwc else x
            parts = loss_fn(system(x), x, y)
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            _check_finite(parts, torch.nn.utils.clip_grad_norm_(params, float("inf")), name, epoch, step)
            opt.step()
            if aux_opt is not None:
                aux_opt.zero_grad(set_to_none=True)
                system.codec.aux_loss().backward()
                aux_opt.step()
            for k, v in parts.items():
                sums[k] += float(v.detach()) * len(x)
            n += len(x)
        metrics = {f"train_{k}": v / n for k, v in sums.items()}
        metrics.update(validate(system, loss_fn, val, cfg.batch_size, device, cfg.limit_batches, nhwc))
        history.append({"epoch": epoch, **metrics})
        log(metrics, epoch)
        if epoch + 1 == cfg.epochs:  # the caller saves the model now: a checkpoint of it would be written to be
            break                    # deleted (with Adam's moments, 3x the model: 0.7 GB for FCN-ResNet101)
        save_torch(checkpoint, {
            **(extra or {}), "config_id": config_id, "epoch": epoch, "system": system.state_dict(), "opt": opt.state_dict(),
            "aux_opt": aux_opt.state_dict() if aux_opt is not None else None, "rng": torch.get_rng_state(), "history": history,
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        })
    return history


def load_checkpoint(path: Path, config_id: str) -> Optional[dict]:
    """The checkpoint at `path` if it belongs to this configuration; a stale one is ignored and said so."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a checkpoint is a cache: never fail the run because of it
        print(f"ignoring unreadable checkpoint {path}: {err}", file=sys.stderr)
        return None
    if state.get("config_id") != config_id:
        print(f"ignoring checkpoint {path}: written by another configuration", file=sys.stderr)
        return None
    print(f"resuming from {path} (epoch {state['epoch'] + 1} done)", file=sys.stderr)
    return state
