"""What each stage of the experiment does, as functions of (params, run, paths) -> results.

Stage scripts in `stages/` are thin command-line wrappers around these.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import torch

from tactic import jpeg, tracking
from tactic.config import Params
from tactic.data.prepared import load_split, read_meta
from tactic.evaluate import evaluate_system
from tactic.grid import Run
from tactic.losses import TacticLoss
from tactic.system import (System, build_codec, build_task, build_task_loss, load_codec, load_system, resolve_device,
                           save_system)
from tactic.train import fingerprint, fit, load_checkpoint, make_optimizers


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def _train(p: Params, run: Run, system: System, loss_fn: TacticLoss, optim, cfg, data: Path, models: Path,
           run_params: dict, transform=None) -> dict:
    """Fit `system` for `run` with checkpoints and MLflow logging; save it to `models/<run.key>/model.pt`."""
    device = next(system.parameters()).device
    train, val = load_split(data, "train"), load_split(data, "val")
    manifest = (data / "manifest.json").read_text()
    config_id = fingerprint(run.key, p.model.model_dump(), cfg.model_dump(), run_params, manifest)
    # Beside, not inside, the models folder: DVC deletes a stage's outputs before it re-runs it.
    ckpt_path = models.parent / ".checkpoints" / run.key / "last.pt"
    state = load_checkpoint(ckpt_path, config_id)
    run_id = state.get("mlflow_run_id") if state else None
    params = {"mode": run.mode, "seed": run.seed, "beta": run.beta, "quality": run.quality, "dataset": p.prepare.dataset,
              "codec": "tactic" if system.codec is not None else ("jpeg" if run.mode == "jpeg" else "none"),
              "task": p.model.task.task, "task_net": p.model.task.arch, "lr": cfg.lr, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
              "lmbda_d": loss_fn.lmbda_d, "alpha": loss_fn.alpha, "beta_loss": loss_fn.beta, **run_params}
    with tracking.start_run(run.key, run.stage, params, run_id=run_id) as mlrun:
        t0 = time.perf_counter()
        history = fit(system, loss_fn, optim, train, val, cfg, run.seed, device, ckpt_path, config_id,
                      log=tracking.log_metrics, transform=transform, state=state,
                      extra={"mlflow_run_id": mlrun.info.run_id})
        tracking.log_metrics({"train_seconds": time.perf_counter() - t0})
        save_system(models / run.key / "model.pt", system, run.key, {"history": history, "mlflow_run_id": mlrun.info.run_id})
    ckpt_path.unlink(missing_ok=True)
    return history[-1]


def pretrain_codec(p: Params, run: Run, data: Path, models: Path) -> dict:
    """Rate-distortion training of the codec alone (alpha = 0): L = MSE + beta * bpp."""
    _seed_everything(run.seed)
    device = resolve_device(p)
    meta = read_meta(data)
    system = System(codec=build_codec(p, meta["channels"])).to(device)
    optim = make_optimizers(system, p.pretrain.lr, aux_lr=p.pretrain.aux_lr)
    return _train(p, run, system, TacticLoss(1.0, 0.0, run.beta), optim, p.pretrain, data, models, {})


def train_task(p: Params, run: Run, data: Path, models: Path) -> dict:
    """Train the task network in one of the four modes (see grid.MODES)."""
    _seed_everything(run.seed)
    device = resolve_device(p)
    meta = read_meta(data)
    task, codec, transform = build_task(p, meta), None, None
    task_loss = build_task_loss(p, meta)
    loss_fn = TacticLoss(lmbda_d=0.0, alpha=1.0, beta=0.0, task_loss=task_loss)
    run_params = {}
    if run.mode == "jpeg":
        transform = functools.partial(_jpeg_images, quality=run.quality)
    elif run.mode in ("agnostic", "aware"):
        codec_path = models / run.codec_run.key / "model.pt"
        codec = load_codec(codec_path, device)[0]
        run_params["codec_init"] = run.codec_run.key
        if run.mode == "aware":
            loss_fn = TacticLoss(lmbda_d=1.0, alpha=p.train.alpha, beta=run.beta, task_loss=task_loss)
    system = System(codec, task, codec_frozen=run.mode == "agnostic").to(device)
    loss_fn.to(device)
    if task_loss is not None:
        run_params.update(gamma=p.train.gamma, class_weights=p.train.class_weights)
    optim = make_optimizers(system, p.train.lr, codec_lr=p.train.codec_lr, aux_lr=p.train.aux_lr)
    return _train(p, run, system, loss_fn, optim, p.train, data, models, run_params, transform)


def _jpeg_images(images: np.ndarray, quality: int) -> np.ndarray:
    return jpeg.roundtrip(images, quality)[0]


def evaluate_run(p: Params, run: Run, data: Path, models: Path, device) -> dict:
    meta = read_meta(data)
    path = models / run.key / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run its stage first (`dvc repro {run.stage}`)")
    system, state = load_system(path, p, meta, device)
    row = evaluate_system(system, run, load_split(data, "test"), p.evaluate.batch_size, device, p.evaluate.limit,
                          meta.get("ignore_index", 255))
    row["mlflow_run_id"] = state.get("mlflow_run_id")
    return row
