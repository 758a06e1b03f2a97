"""What each stage of the experiment does, as functions of (params, run, paths) -> results.

Stage scripts in `stages/` are thin command-line wrappers around these.
"""
from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tactic import tracking
from tactic.config import Params
from tactic.data.prepared import load_split, read_meta
from tactic.errors import TacticError
from tactic.experiment.evaluate import evaluate_system
from tactic.experiment.grid import Run, task_runs
from tactic.io import write_json
from tactic.losses import TacticLoss
from tactic.metrics import TEST_METRICS, at_chance, tracked_names
from tactic.experiment.modes import MODES, Plan, digest
from tactic.experiment.system import System, build_codec, load_system, resolve_device, save_system
from tactic.experiment.train import fingerprint, fit, load_checkpoint, make_optimizers


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def _train(p: Params, run: Run, plan: Plan, data: Path, models: Path) -> dict:
    """Fit `plan.system` for `run` with checkpoints and MLflow logging; save it (or `plan.save`, the
    system as evaluated, when training ran on cached codes) to the run's model file. `plan.splits`
    replaces the prepared (train, val) splits: a callable, so cached codes are made inside the MLflow run."""
    system, loss_fn, cfg = plan.system, plan.loss, plan.cfg
    device = next(system.parameters()).device
    manifest = (data / "manifest.json").read_text()
    config_id = fingerprint(run.key, p.model.model_dump(), cfg.model_dump(), plan.run_params, manifest)
    ckpt_path = run.work_dir(models) / "last.pt"
    state = load_checkpoint(ckpt_path, config_id)
    run_id = state.get("mlflow_run_id") if state else None
    saved = plan.save or system
    params = {"mode": run.mode, "seed": run.seed, "beta": run.beta, "quality": run.quality, "dataset": p.prepare.dataset,
              "codec": "jpeg" if run.mode == "jpeg" else getattr(saved.codec, "arch", "none"),
              "quantizer": getattr(system.codec, "quantizer", None),
              "task": p.model.task.task, "task_net": p.model.task.arch, "lr": cfg.lr, "lr_schedule": cfg.lr_schedule, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
              "lmbda_d": loss_fn.lmbda_d, "alpha": loss_fn.alpha, "beta_loss": loss_fn.beta, **plan.run_params}
    style = MODES[run.mode].style if run.mode in MODES else None  # the runs of a mode share the report's colour
    tags = {**_grid_tags(p), "mlflow.runColor": style[0] if style else "#000000"}
    with tracking.start_run(run.key, run.stage, params, run_id=run_id, tags=tags) as mlrun:
        t0 = time.perf_counter()
        train, val = plan.splits() if plan.splits else (load_split(data, "train"), load_split(data, "val"))
        history = fit(system, loss_fn, plan.optimizers, train, val, cfg, run.seed, device, ckpt_path, config_id,
                      log=lambda m, step: tracking.log_metrics(tracked_names(m, p.model.task.task), step), state=state,
                      extra={"mlflow_run_id": mlrun.info.run_id}, name=run.stage)
        tracking.log_metrics({"train_seconds": time.perf_counter() - t0})
        _warn_at_chance(history[-1], len(val), len(read_meta(data)["classes"]), run.stage)
        save_system(run.model_path(models), saved, run.key, {"history": history, "mlflow_run_id": mlrun.info.run_id})
        tracking.set_tag("model_path", str(run.model_path(models)))  # its DVC hash: tagged by `evaluate`, once DVC has it
    ckpt_path.unlink(missing_ok=True)
    for f in plan.caches:
        f.unlink(missing_ok=True)
    return history[-1]


def _grid_tags(p: Params) -> dict:
    """What makes the runs of one grid one filterable group in MLflow: the hash of its validated
    params without the lists of seeds and operating points (a grid extended by a seed stays one group)
    or the machine settings, and the DVC experiment (`dvc exp run` sets DVC_EXP_NAME)."""
    grid = p.model_dump(exclude={"seeds": True, "betas": True, "device": True, "threads": True, "report": True,
                                 "jpeg": {"qualities"}, "latent": {"qualities"}})
    tags = {"params_hash": fingerprint(grid), "dataset": p.prepare.dataset, "task": p.model.task.task}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp"] = os.environ["DVC_EXP_NAME"]
    return tags


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
    return _train(p, run, Plan(system, TacticLoss(1.0, 0.0, run.beta), optim, p.pretrain), data, models)


def pretrain_hyperprior(p: Params, run: Run, data: Path, models: Path) -> dict:
    """bmshj2018 rate-distortion training at `run.quality`: L = lambda * 255^2 * MSE + bpp, CompressAI's
    loss and lambda; from scratch, or from the CompressAI checkpoint `latent.checkpoint` names."""
    from tactic.codecs.hyperprior import LMBDA, Hyperprior, load_hyperprior

    _seed_everything(run.seed)
    device = resolve_device(p)
    meta = read_meta(data)
    h, w = meta["size"]
    if h % Hyperprior.downsampling or w % Hyperprior.downsampling:
        raise TacticError(f"prepare.size: the hyperprior needs images a multiple of {Hyperprior.downsampling} pixels "
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
    run_params = {"lmbda": LMBDA[q], "N": codec.N, "M": codec.M, "codec_checkpoint": lat.checkpoint,
                  "codec_checkpoint_sha256": digest(lat.checkpoint and lat.checkpoint.format(quality=q))}
    return _train(p, run, Plan(system, loss, optim, lat.pretrain, run_params), data, models)


def train_task(p: Params, run: Run, data: Path, models: Path) -> dict:
    """Train the task network of `run` in its mode (tactic.experiment.modes: how each mode builds and trains)."""
    _seed_everything(run.seed)
    plan = MODES[run.mode].plan(p, run, read_meta(data), data, models, resolve_device(p))
    return _train(p, run, plan, data, models)


def evaluate_grid(p: Params, data: Path, models: Path, out: Path) -> list[dict]:
    """The `evaluate` stage: every run of the grid on the test split (rates from real bitstreams),
    one row each into `out`; each run's test metrics also go into its own MLflow run, so the MLflow
    UI shows loss weights, bpp and accuracy side by side."""
    device = resolve_device(p)
    runs = task_runs(p)
    with tracking.start_run("evaluate", "evaluate", {"stage": "evaluate", "num_runs": len(runs), **p.evaluate.model_dump()},
                            tags=_grid_tags(p)):
        client = tracking.setup().MlflowClient()
        outs = _dvc_outs()
        rows, t0 = [], time.perf_counter()
        for i, run in enumerate(runs):
            row = evaluate_run(p, run, data, models, device)
            rows.append(row)
            print(f"[{i + 1}/{len(runs)}] {run.key}: accuracy {row.get('accuracy', float('nan')):.4f} bpp {row['bpp']:.4f}",
                  file=sys.stderr)
            if row.get("mlflow_run_id"):
                test = {k: row[k] for k in TEST_METRICS[p.model.task.task] if row.get(k) is not None}
                for k, v in tracked_names(test, p.model.task.task).items():
                    client.log_metric(row["mlflow_run_id"], k, v)
                if run.stage in outs:
                    client.set_tag(row["mlflow_run_id"], "dvc_md5", outs[run.stage])
        # Time inside the evaluation loop, as training logs train_seconds (benchmarks/stage_overhead.py).
        tracking.log_metrics({"eval_seconds": time.perf_counter() - t0})
        write_json(out, rows)
        tracking.log_artifact(out)
    return rows


def _dvc_outs(lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """{stage: the hash DVC recorded for its output}, from dvc.lock (in the repository DVC runs the
    stage in): the model a training run made, as `dvc` names it. Empty where DVC has not run."""
    if not lock.is_file():
        return {}
    import yaml

    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {name: s["outs"][0]["md5"] for name, s in stages.items() if s.get("outs") and "md5" in s["outs"][0]}


def evaluate_run(p: Params, run: Run, data: Path, models: Path, device) -> dict:
    meta, mode = read_meta(data), MODES[run.mode]
    path = run.model_path(models)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run its stage first (`dvc repro {run.stage}`)")
    system, state = load_system(path, functools.partial(mode.task_network, p, meta), device, mode.latent,
                                f"the model of stage {run.stage}")
    row = evaluate_system(system, run, load_split(data, "test"), p.evaluate.batch_size, device, p.evaluate.limit,
                          meta.get("ignore_index", 255))
    row["mlflow_run_id"] = state.get("mlflow_run_id")
    row["history"] = state.get("history", [])  # per-epoch training log, for the report's training curves
    return row
