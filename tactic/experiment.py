"""What each stage of the experiment does, as functions of (params, run, paths) -> results.

Stage scripts in `stages/` are thin command-line wrappers around these.
"""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from tactic import jpeg, tracking
from tactic.io import BadFileError, sha256
from tactic.config import Params
from tactic.data import batches
from tactic.data.prepared import Split, load_split, read_meta
from tactic.evaluate import evaluate_system
from tactic.grid import LATENT_MODES, Run
from tactic.losses import TacticLoss
from tactic.metrics import at_chance
from tactic.system import (System, build_codec, build_task, build_task_loss, load_codec, load_system, resolve_device,
                           save_system)
from tactic.train import fingerprint, fit, load_checkpoint, make_optimizers


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def _digest(path: Optional[str]) -> Optional[str]:
    """The hash of a file params name: in the run's params and checkpoint fingerprint, so new contents
    under the same path never resume (or pass for) a run trained from the old ones."""
    return sha256(Path(path))[:16] if path and Path(path).is_file() else None


def _codec_name(codec) -> str:
    return "none" if codec is None else ("bmshj2018-hyperprior" if "quality" in codec.config else "tactic")


def _train(p: Params, run: Run, system: System, loss_fn: TacticLoss, optim, cfg, data: Path, models: Path,
           run_params: dict, transform=None, splits=None, save: Optional[System] = None) -> dict:
    """Fit `system` for `run` with checkpoints and MLflow logging; save it (or `save`, the system as
    evaluated, when training ran on cached codes) to `models/<run.key>/model.pt`. `splits` replaces
    the prepared (train, val) splits: a callable, so cached codes are made inside the MLflow run."""
    device = next(system.parameters()).device
    manifest = (data / "manifest.json").read_text()
    config_id = fingerprint(run.key, p.model.model_dump(), cfg.model_dump(), run_params, manifest)
    # Beside, not inside, the models folder: DVC deletes a stage's outputs before it re-runs it.
    ckpt_path = models.parent / ".checkpoints" / run.key / "last.pt"
    state = load_checkpoint(ckpt_path, config_id)
    run_id = state.get("mlflow_run_id") if state else None
    saved = save or system
    params = {"mode": run.mode, "seed": run.seed, "beta": run.beta, "quality": run.quality, "dataset": p.prepare.dataset,
              "codec": "jpeg" if run.mode == "jpeg" else _codec_name(saved.codec),
              "quantizer": getattr(system.codec, "quantizer", None),
              "task": p.model.task.task, "task_net": p.model.task.arch, "lr": cfg.lr, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
              "lmbda_d": loss_fn.lmbda_d, "alpha": loss_fn.alpha, "beta_loss": loss_fn.beta, **run_params}
    with tracking.start_run(run.key, run.stage, params, run_id=run_id) as mlrun:
        t0 = time.perf_counter()
        train, val = splits() if splits else (load_split(data, "train"), load_split(data, "val"))
        history = fit(system, loss_fn, optim, train, val, cfg, run.seed, device, ckpt_path, config_id,
                      log=tracking.log_metrics, transform=transform, state=state,
                      extra={"mlflow_run_id": mlrun.info.run_id}, name=run.stage)
        tracking.log_metrics({"train_seconds": time.perf_counter() - t0})
        _warn_at_chance(history[-1], len(val), len(read_meta(data)["classes"]), run.stage)
        save_system(models / run.key / "model.pt", saved, run.key, {"history": history, "mlflow_run_id": mlrun.info.run_id})
    ckpt_path.unlink(missing_ok=True)
    return history[-1]


def _warn_at_chance(last: dict, num_val: int, classes: int, stage: str) -> None:
    """A classifier that ends at chance on validation (a learning rate too high, a collapsed codec)
    is not an error, but it must not pass unnoticed: a warning line and a tag on the MLflow run."""
    acc = last.get("val_accuracy")
    if acc is None or "val_miou" in last or classes < 2 or not at_chance(acc, classes, num_val):
        return
    msg = f"{stage}: validation accuracy {acc:.4f} is at chance (1/{classes}): the task network did not learn"
    print(f"warning: {msg}", file=sys.stderr)
    tracking.set_tag("warning", msg)


def pretrain_codec(p: Params, run: Run, data: Path, models: Path) -> dict:
    """Rate-distortion training of the codec alone (alpha = 0): L = MSE + beta * bpp."""
    _seed_everything(run.seed)
    device = resolve_device(p)
    meta = read_meta(data)
    system = System(codec=build_codec(p, meta["channels"])).to(device)
    optim = make_optimizers(system, p.pretrain.lr, aux_lr=p.pretrain.aux_lr)
    return _train(p, run, system, TacticLoss(1.0, 0.0, run.beta), optim, p.pretrain, data, models, {})


def pretrain_hyperprior(p: Params, run: Run, data: Path, models: Path) -> dict:
    """bmshj2018 rate-distortion training at `run.quality`: L = lambda * 255^2 * MSE + bpp, CompressAI's
    loss and lambda; from scratch, or from the CompressAI checkpoint `latent.checkpoint` names."""
    from tactic.models.hyperprior import LMBDA, Hyperprior, load_hyperprior

    _seed_everything(run.seed)
    device = resolve_device(p)
    meta = read_meta(data)
    h, w = meta["size"]
    if h % Hyperprior.downsampling or w % Hyperprior.downsampling:
        raise ValueError(f"prepare.size: the hyperprior needs images a multiple of {Hyperprior.downsampling} pixels "
                         f"(its latent is 1/16, its hyper-latent 1/64 of the image), the prepared ones are {h}x{w}")
    q, lat = run.quality, p.latent
    if lat.checkpoint:
        codec = load_hyperprior(lat.checkpoint.format(quality=q), q, meta["channels"], lat.N, lat.M)
    else:
        codec = Hyperprior(q, meta["channels"], lat.N, lat.M)
    codec.quantizer = p.model.codec.quantizer
    system = System(codec=codec).to(device)
    optim = make_optimizers(system, lat.pretrain.lr, aux_lr=lat.pretrain.aux_lr)
    loss = TacticLoss(lmbda_d=LMBDA[q] * 255**2, alpha=0.0, beta=1.0)
    return _train(p, run, system, loss, optim, lat.pretrain, data, models,
                  {"lmbda": LMBDA[q], "N": codec.N, "M": codec.M, "codec_checkpoint": lat.checkpoint,
                   "codec_checkpoint_sha256": _digest(lat.checkpoint and lat.checkpoint.format(quality=q))})


def _coded_splits(codec, data: Path, what: str, batch_size: int, device, cache: Path):
    """(train, val) as a frozen-codec mode trains on them: every image entropy coded once to its own
    bitstream and decoded back, to latents (y_hat | sigma_hat, float32) or to 8-bit pixels, streamed
    into .npy caches beside the checkpoints (memory-mapped, so any dataset size fits)."""
    from tactic.models.hyperprior import decode_latents, decode_pixels, encode

    out = []
    for name in ("train", "val"):
        split = load_split(data, name)
        path = cache / f"{what}-{name}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        arr, start = None, 0
        for x, _ in batches(split, batch_size, device):
            packed = encode(codec, x)
            names = [f"{name} image {start + i}" for i in range(len(x))]
            if what == "latents":
                dec = decode_latents(codec, packed["streams"], packed["shape"], names)
                rows = torch.cat([dec["y_hat"], dec["sigma_hat"]], 1).float()
            else:  # the decoder's output as an 8-bit image, as a decoded file would be
                rows = (decode_pixels(codec, packed["streams"], packed["shape"], names)["x_hat"] * 255).round().byte()
            rows = rows.permute(0, 2, 3, 1).cpu().numpy()
            if arr is None:
                arr = np.lib.format.open_memmap(path, "w+", rows.dtype, (len(split), *rows.shape[1:]))
            arr[start:start + len(x)] = rows
            start += len(x)
        arr.flush()
        out.append(Split(np.load(path, mmap_mode="r"), np.asarray(split.labels)))
    return tuple(out)


def train_latent(p: Params, run: Run, data: Path, models: Path) -> dict:
    """The compressed-domain modes on the pre-trained hyperprior of `run.quality`:
    - latent-frozen: codec fixed; cResNet-39 trained on latents decoded from real bitstreams;
    - latent-joint: codec and cResNet-39 trained together, L = alpha * CE + lmbda * MSE + beta * bpp;
    - pixel-decoded: codec fixed; ResNet-50 trained on pixels decoded from real bitstreams."""
    _seed_everything(run.seed)
    device = resolve_device(p)
    meta = read_meta(data)
    codec = load_codec(models / run.codec_run.key / "model.pt", device, f"the model of stage {run.codec_run.stage}")[0]
    if codec.config.get("quality") != run.quality:
        raise BadFileError(f"the model of stage {run.codec_run.stage}: {models / run.codec_run.key / 'model.pt'} holds "
                           f"a codec of quality {codec.config.get('quality')}, not {run.quality} (re-run that stage)")
    cfg = p.latent.train
    task = build_task(p, meta, run.mode, codec.M)
    run_params = {"codec_init": run.codec_run.key, "N": codec.N, "M": codec.M, "task_net": type(task).__name__,
                  "weights_sha256": _digest(p.latent.weights)}
    if run.mode == "latent-joint":
        codec.quantizer = p.model.codec.quantizer
        system = System(codec, task, latent=True, decode=cfg.lmbda > 0).to(device)
        loss_fn = TacticLoss(lmbda_d=cfg.lmbda, alpha=cfg.alpha, beta=cfg.beta)
        optim = make_optimizers(system, cfg.lr, codec_lr=cfg.codec_lr, aux_lr=cfg.aux_lr)
        return _train(p, run, system, loss_fn, optim, cfg, data, models, run_params)
    codec.eval()
    what = "pixels" if run.mode == "pixel-decoded" else "latents"
    cache = models.parent / ".checkpoints" / run.key
    system = System(None, task).to(device)  # trains on the cached decoded codes
    evaluated = System(codec, task, codec_frozen=True, latent=what == "latents")
    optim = make_optimizers(system, cfg.lr)
    loss_fn = TacticLoss(lmbda_d=0.0, alpha=1.0, beta=0.0)
    splits = functools.partial(_coded_splits, codec, data, what, p.evaluate.batch_size, device, cache)
    last = _train(p, run, system, loss_fn, optim, cfg, data, models, run_params, splits=splits, save=evaluated)
    for f in cache.glob(f"{what}-*.npy"):
        f.unlink()
    return last


def train_task(p: Params, run: Run, data: Path, models: Path) -> dict:
    """Train the task network in one of the modes (see grid.MODES)."""
    if run.mode in LATENT_MODES:
        return train_latent(p, run, data, models)
    _seed_everything(run.seed)
    device = resolve_device(p)
    meta = read_meta(data)
    task, codec, transform = build_task(p, meta), None, None
    task_loss = build_task_loss(p, meta)
    loss_fn = TacticLoss(lmbda_d=0.0, alpha=1.0, beta=0.0, task_loss=task_loss)
    run_params = {"weights_sha256": _digest(p.model.task.weights)}
    if run.mode == "jpeg":
        transform = functools.partial(_jpeg_images, quality=run.quality)
    elif run.mode in ("agnostic", "aware"):
        codec_path = models / run.codec_run.key / "model.pt"
        codec = load_codec(codec_path, device, f"the model of stage {run.codec_run.stage}")[0]
        run_params["codec_init"] = run.codec_run.key
        if run.mode == "aware":
            codec.quantizer = p.model.codec.quantizer
            loss_fn = TacticLoss(lmbda_d=p.train.lmbda_d, alpha=p.train.alpha, beta=run.beta, task_loss=task_loss)
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
    system, state = load_system(path, p, meta, device, run.mode, f"the model of stage {run.stage}")
    row = evaluate_system(system, run, load_split(data, "test"), p.evaluate.batch_size, device, p.evaluate.limit,
                          meta.get("ignore_index", 255))
    row["mlflow_run_id"] = state.get("mlflow_run_id")
    return row
