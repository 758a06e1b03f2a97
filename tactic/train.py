"""The training loop shared by every mode: epochs over the prepared split, an MLflow metric per
epoch, a checkpoint per epoch, and resumption from that checkpoint after an interruption."""
from __future__ import annotations

import hashlib
import json
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
from tactic.metrics import psnr
from tactic.system import System


def fingerprint(*parts) -> str:
    """Identifies a training configuration, so a checkpoint is resumed only by the same one."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    return torch.optim.Adam(groups), aux


@torch.no_grad()
def validate(system: System, loss_fn: TacticLoss, split: Split, batch_size: int, device, limit_batches=None) -> dict:
    """Loss parts, accuracy and PSNR with the codec in inference mode (rounding; estimated bpp)."""
    system.eval()
    sums, n, correct = defaultdict(float), 0, 0
    for x, y in batches(split, batch_size, device, limit_batches=limit_batches):
        out = system(x)
        for k, v in loss_fn(out, x, y).items():
            sums[k] += float(v) * len(x)
        if "logits" in out:
            correct += int((out["logits"].argmax(1) == y).sum())
        if "x_hat" in out:
            sums["psnr"] += float(psnr(out["x_hat"], x).sum())
        n += len(x)
    metrics = {f"val_{k}": v / n for k, v in sums.items()}
    if system.task is not None:
        metrics["val_accuracy"] = correct / n
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
    transform=None,
    state: Optional[dict] = None,
    extra: Optional[dict] = None,
) -> list[dict]:
    """Train for `cfg.epochs` from scratch, or from `state`, a checkpoint read by `load_checkpoint`.

    `extra` (e.g. the MLflow run id) is stored in every checkpoint written.
    """
    opt, aux_opt = optimizers
    history, start = [], 0
    if state is not None:
        system.load_state_dict(state["system"])
        opt.load_state_dict(state["opt"])
        if aux_opt is not None:
            aux_opt.load_state_dict(state["aux_opt"])
        torch.set_rng_state(state["rng"])
        history, start = state["history"], state["epoch"] + 1
    total = num_batches(train, cfg.batch_size, cfg.limit_batches)
    for epoch in range(start, cfg.epochs):
        system.train()
        sums, n = defaultdict(float), 0
        # The shuffle depends on (seed, epoch) only, so a resumed run sees the batches it would have seen.
        it = batches(train, cfg.batch_size, device, seed * 10_000 + epoch, cfg.limit_batches, transform)
        for x, y in tqdm(it, total=total, desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr, disable=None, leave=False):
            parts = loss_fn(system(x), x, y)
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            opt.step()
            if aux_opt is not None:
                aux_opt.zero_grad(set_to_none=True)
                system.codec.aux_loss().backward()
                aux_opt.step()
            for k, v in parts.items():
                sums[k] += float(v.detach()) * len(x)
            n += len(x)
        metrics = {f"train_{k}": v / n for k, v in sums.items()}
        metrics.update(validate(system, loss_fn, val, cfg.batch_size, device, cfg.limit_batches))
        history.append({"epoch": epoch, **metrics})
        log(metrics, epoch)
        save_torch(checkpoint, {
            **(extra or {}), "config_id": config_id, "epoch": epoch, "system": system.state_dict(), "opt": opt.state_dict(),
            "aux_opt": aux_opt.state_dict() if aux_opt is not None else None, "rng": torch.get_rng_state(), "history": history,
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
