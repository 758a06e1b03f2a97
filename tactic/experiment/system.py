"""A codec (optional) in front of a task network (optional), built from params, saved as one file."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from tactic.config import Params
from tactic.errors import TacticError
from tactic.io import BadFileError, load_torch, save_torch
from tactic.tasks.classifiers import build_classifier
from tactic.tasks.cresnet import LatentHead
from tactic.tasks.pooling import deterministic_pooling


def resolve_device(p: Params) -> torch.device:
    # TACTIC_THREADS: set by the flow, which runs several stages at once on the same cores.
    torch.set_num_threads(p.threads or int(os.environ.get("TACTIC_THREADS", 0)) or os.cpu_count())
    if p.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' asked for but CUDA is not available (use 'auto' or 'cpu')")
    device = torch.device("cuda" if p.device != "cpu" and torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        # The same seed gives the same run on a GPU too: cuDNN picks no algorithm by timing, cuBLAS
        # keeps a fixed workspace (read when its first handle is made, after this), and an op with no
        # deterministic CUDA kernel warns instead of varying silently.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device


class System(nn.Module):
    """x -> [codec] -> x_hat -> [task] -> logits, or with `latent`, x -> codec -> (y_hat, sigma_hat) -> task.

    With `codec_frozen`, the codec stays in eval mode (rounding, no noise) and gets no gradients:
    the task-agnostic setting. A `latent` system runs the pixel decoder only when `decode` (its MSE
    is weighted in the loss). Mixed precision (bf16 on CUDA) covers the task network only: the
    entropy model's likelihoods need float32.
    """

    def __init__(self, codec: Optional[nn.Module] = None, task: Optional[nn.Module] = None, codec_frozen: bool = False,
                 latent: bool = False, decode: bool = True):
        super().__init__()
        if task is not None:
            deterministic_pooling(task)  # the same seed, the same weights on a GPU too (see resolve_device)
        self.codec, self.task, self.codec_frozen, self.latent, self.decode = codec, task, codec_frozen, latent, decode
        if codec is not None and codec_frozen:
            codec.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.codec is not None and self.codec_frozen:
            self.codec.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict:
        out = {}
        if self.codec is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.codec_frozen):
                out.update(self.codec(x, decode=self.decode) if self.latent else self.codec(x))
            x = LatentHead.pack(out["y_hat"], out["sigma_hat"]) if self.latent else out["x_hat"]
        if self.task is not None:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
                out["logits"] = self.task(x).float()
        return out


def build_codec(p: Params, in_channels: int):
    from tactic.codecs.codec import TacticCodec  # imports CompressAI: only where a codec is needed

    c = p.model.codec
    return TacticCodec(in_channels, c.N, c.M, c.quantizer, c.latent_relu)


# Every model file names its codec's architecture; the classes are imported only when a file needs one.
CODECS = {"tactic": "tactic.codecs.codec:TacticCodec", "bmshj2018-hyperprior": "tactic.codecs.hyperprior:Hyperprior"}


def codec_class(arch: str):
    import importlib

    module, name = CODECS[arch].split(":")
    return getattr(importlib.import_module(module), name)


def build_task(p: Params, meta: dict) -> nn.Module:
    """The task network params name (model.task); the compressed-domain modes build their own."""
    t = p.model.task
    if t.task == "segmentation":
        from tactic.tasks.segmenters import build_segmenter

        return build_segmenter(t.arch, meta["channels"], len(meta["classes"]), t.width, t.weights)
    return build_classifier(t.arch, meta["channels"], len(meta["classes"]), t.width, t.weights)


def build_task_loss(p: Params, meta: dict):
    """L_T: cross-entropy for classification; weighted cross-entropy + gamma * Dice for segmentation."""
    if p.model.task.task != "segmentation":
        return None  # TacticLoss's default, cross-entropy
    from tactic.losses import SegmentationLoss

    weights = p.train.class_weights
    if weights is not None and len(weights) != len(meta["classes"]):
        raise TacticError(f"train.class_weights: {len(weights)} weights for {len(meta['classes'])} classes ({meta['dataset']})")
    return SegmentationLoss(p.train.gamma, weights, meta.get("ignore_index", 255))


def save_system(path: Path | str, system: System, run_key: str, extra: dict | None = None) -> None:
    """One self-contained file per trained run: codec (with its CDF tables) and task weights and configs."""
    codec = system.codec
    if codec is not None:
        codec.update(force=True)  # the CDF tables the range coder needs are computed from the final weights
    save_torch(path, {
        "run": run_key,
        "codec": None if codec is None else {"arch": codec.arch, "config": codec.config, "state": codec.state_dict()},
        "task": None if system.task is None else system.task.state_dict(),
        **(extra or {}),
    })


def _read_model(path: Path | str, what: str) -> dict:
    state = load_torch(path, what, weights_only=False)  # our own files: configs beside the tensors
    if not isinstance(state, dict) or "run" not in state:
        raise BadFileError(f"{what}: {path} is a PyTorch file but not a model this pipeline saved")
    return state


def _load_into(module: nn.Module, weights: dict, path, what: str) -> None:
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:  # missing/unexpected keys, another shape: written for other params
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise BadFileError(f"{what}: {path} does not fit {type(module).__name__} (wrong architecture; re-run its "
                           f"stage): {lines[-1][:300]}") from err


def load_codec(path: Path | str, device="cpu", what: str = "model file", state: Optional[dict] = None):
    """The codec saved in `path` (a model.pt); `what` names the file in errors (e.g. its stage)."""
    state = state or _read_model(path, what)
    if not state.get("codec"):
        raise BadFileError(f"{what}: {path} holds no codec")
    arch = state["codec"].get("arch")
    if arch not in CODECS:
        raise BadFileError(f"{what}: {path}: codec architecture {arch!r} is none of {sorted(CODECS)} "
                           "(written by another version: re-run its stage)")
    codec = codec_class(arch)(**state["codec"]["config"])
    _load_into(codec, state["codec"]["state"], path, what)
    if arch == "bmshj2018-hyperprior":
        codec.update(force=True)  # rebuild the coder tables from the loaded weights, as before any bitstream
    return codec.to(device), state


def load_system(path: Path | str, task_network: Callable[[Optional[nn.Module]], nn.Module], device="cpu",
                latent: bool = False, what: str = "model file") -> tuple[System, dict]:
    """The system saved in `path`, read once; `task_network(codec)` builds the task network its
    weights go into (the mode's), `latent` feeds it the latents; `what` names the file in errors."""
    state = _read_model(path, what)
    codec = load_codec(path, device, what, state)[0] if state.get("codec") else None
    task = None
    if state.get("task") is not None:
        task = task_network(codec)
        _load_into(task, state["task"], path, what)
    return System(codec, task, latent=latent).to(device).eval(), state
