"""The mode table: one class per mode of the experiment, saying everything that differs between them.

A mode says which operating point it takes (`point`: a rate weight beta, a codec or JPEG quality,
or none) and which pre-trained codec it starts from (`pretrain`); how its system is built and
trained (`plan`: networks, loss, optimisers, what it trains on); what its task network sees at
test time from a real bitstream (`code`, which the modes with a fixed codec or JPEG also train on,
so training and testing cannot drift apart); and how the report draws and compares it (`style`, `references`).

Adding a mode is one subclass here, registered in MODES, and one matrix stage in dvc.yaml: the
grid (tactic.experiment.grid) names its stage, folders and MLflow runs after `name`, the `train` stage and
`evaluate` run it through `plan` and `code`, the report plots it with `style` and computes
BD-accuracy and BD-rate against each of its `references`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from tactic.codecs import jpeg
from tactic.config import Params
from tactic.data import to_float
from tactic.data.prepared import Split, load_split
from tactic.io import BadFileError, sha256
from tactic.losses import TacticLoss, bpp as estimated_bpp
from tactic.experiment.system import System, build_task, build_task_loss, load_codec
from tactic.experiment.train import make_optimizers
from tactic.tasks.cresnet import LatentHead


@dataclass
class Coded:
    """A batch as the task network sees it at test time, and what storing it cost."""
    task_input: torch.Tensor
    bits: float  # everything stored: bitstreams (framing included), JPEG scans, raw pixels
    decoded: Optional[torch.Tensor] = None  # the image PSNR is measured on (None: no decoded image)
    bits_estimated: Optional[float] = None  # the entropy model's estimate, beside the real count
    bits_file: Optional[float] = None  # JPEG: the whole files, headers included


@dataclass
class Plan:
    """How one run trains: what `experiment._train` fits and saves."""
    system: System
    loss: TacticLoss
    optimizers: tuple
    cfg: object  # OptimParams: epochs, batch_size, lr, ...
    run_params: dict = field(default_factory=dict)  # logged to MLflow and in the checkpoint fingerprint
    splits: Optional[Callable] = None  # replaces the prepared (train, val): cached test-time inputs
    save: Optional[System] = None  # the system as evaluated, when `system` trains on cached inputs
    caches: Sequence[Path] = ()  # files to delete after training


def digest(path: Optional[str]) -> Optional[str]:
    """The hash of a file params name: in the run's params and checkpoint fingerprint, so new contents
    under the same path never resume (or pass for) a run trained from the old ones."""
    return sha256(Path(path))[:16] if path and Path(path).is_file() else None


class Mode:
    name: str
    point: Optional[str] = None  # "beta" or "quality": the operating point a run of this mode takes
    pretrain: Optional[str] = None  # the pre-training mode whose codec a run starts from
    # Plot colour (matplotlib's tableau palette, as hex: MLflow's run colour too) and marker;
    # None: drawn as a reference line.
    style: Optional[tuple[str, str]] = None
    references: tuple[str, ...] = ()  # modes this one is compared with: BD-accuracy, BD-rate

    latent = False  # the task network reads the codec's latents (y_hat, sigma_hat), not pixels
    # The task network trains on what `code` gives (the front end, a fixed codec or JPEG, is
    # deterministic): made once per image into memory-mapped .npy files, not again every epoch
    # (unless they would exceed CACHE_LIMIT_GIB: then made again for every batch read).
    cached = False
    eight_bit = False  # ... stored as uint8: `code` gives 8-bit images (JPEG, decoded files)

    def points(self, p: Params) -> list:
        """The operating points params give this mode (its `point` values; [None] without one)."""
        return [None]

    def task_network(self, p: Params, meta: dict, codec=None) -> torch.nn.Module:
        """The task network of a run (for training, and to load a trained one into)."""
        return build_task(p, meta)

    def plan(self, p: Params, run, meta: dict, data: Path, models: Path, device) -> Plan:
        raise NotImplementedError

    def code(self, system: System, x: torch.Tensor, quality: Optional[int], names: Sequence[str],
             measure: bool = True) -> Coded:
        """What the task network sees of images `x` after a real round trip; `measure` adds the
        estimate and the decoded image for PSNR (not needed to build training caches)."""
        raise NotImplementedError

    def _codec(self, run, models: Path, device):
        return load_codec(run.codec_run.model_path(models), device, f"the model of stage {run.codec_run.stage}")[0]

    def _codec_init(self, run, models: Path) -> dict:
        """The pre-trained codec a run starts from, by run and by content: in the run's params and in its
        checkpoint's fingerprint, so a checkpoint made from a codec since re-trained is not resumed."""
        return {"codec_init": run.codec_run.key, "codec_init_sha256": digest(str(run.codec_run.model_path(models)))}

    def _on_cached_codes(self, plan: Plan, p: Params, run, data: Path, device, models: Path) -> Plan:
        """`plan` with its task network training on the codes of `plan.system` (saved as it is
        evaluated), cached: the optimisers already hold only the task network's parameters."""
        evaluated, cache = plan.system.eval(), run.work_dir(models)  # `fit` puts the task network back in training mode
        splits = functools.partial(self._cached_splits, evaluated, run.quality, data, p.evaluate.batch_size, device, cache)
        # In the fingerprint: a checkpoint of the same run trained through the codec is not resumed.
        return dataclasses.replace(plan, system=System(None, evaluated.task).to(device), splits=splits, save=evaluated,
                                   run_params={**plan.run_params, "trains_on": "cached codes"},
                                   caches=[cache / f"codes-{name}.npy" for name in ("train", "val")])

    def _cached_splits(self, system: System, quality, data: Path, batch_size: int, device, cache: Path) -> tuple[Split, Split]:
        splits = {name: load_split(data, name) for name in ("train", "val")}
        coded = {name: CodedImages(self, system, quality, name, split.images, device) for name, split in splits.items()}
        first = coded["train"][np.arange(1)]
        limit = float(os.environ.get("TACTIC_CODE_CACHE_GIB", CACHE_LIMIT_GIB))
        if first.nbytes * sum(map(len, splits.values())) > limit * 2**30:
            return tuple(Split(coded[name], np.asarray(split.labels)) for name, split in splits.items())
        out = []
        for name, split in splits.items():
            path = cache / f"codes-{name}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            arr = np.lib.format.open_memmap(path, "w+", first.dtype, (len(split), *first.shape[1:]))
            for start in range(0, len(split), batch_size):
                arr[start:start + batch_size] = coded[name][np.arange(start, min(start + batch_size, len(split)))]
            arr.flush()
            out.append(Split(np.load(path, mmap_mode="r"), np.asarray(split.labels)))
        return tuple(out)

    def _rows(self, coded: Coded) -> np.ndarray:
        """A coded batch as stored rows: (N, H, W, C), uint8 where `code` gives 8-bit images."""
        x = coded.task_input
        return ((x * 255).round().byte() if self.eight_bit else x.float()).permute(0, 2, 3, 1).cpu().numpy()


# Codes of train + val larger than this (GiB; TACTIC_CODE_CACHE_GIB) are not cached but made again
# from the prepared images whenever training reads a batch: `agnostic` on ImageNet-50 at 300 px would
# cache 70 GB of float32 images, the frozen latent modes on MINC-2500 at 384 px about 50 GB.
CACHE_LIMIT_GIB = 2.0


class CodedImages:
    """A split's images as `mode.code` gives them, made when indexed (`images[idx]`, as `batches` reads)."""

    def __init__(self, mode: Mode, system: System, quality, name: str, images: np.ndarray, device):
        self.mode, self.system, self.quality, self.name, self.images, self.device = mode, system, quality, name, images, device

    def __len__(self):
        return len(self.images)

    @torch.no_grad()
    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        x = to_float(self.images[idx], self.device)
        return self.mode._rows(self.mode.code(self.system, x, self.quality, [f"{self.name} image {i}" for i in idx], measure=False))


# -- TACTIC's modes: a task network behind no codec, JPEG, or the TACTIC codec ---------------------

class _TacticMode(Mode):
    """Task network trained on the prepared images as this mode shows them; L_T alone, unless `aware`."""

    def plan(self, p, run, meta, data, models, device):
        task = self.task_network(p, meta)  # before the codec is loaded: the seeded initialisation stays the same
        task_loss = build_task_loss(p, meta)
        loss = TacticLoss(lmbda_d=0.0, alpha=1.0, beta=0.0, task_loss=task_loss)
        run_params = {"weights_sha256": digest(p.model.task.weights)}
        codec = None
        if self.pretrain:
            codec = self._codec(run, models, device)
            run_params.update(self._codec_init(run, models))
            loss = self._codec_loss(p, run, codec, task_loss) or loss
        system = System(codec, task, codec_frozen=self.name == "agnostic").to(device)
        loss.to(device)
        if task_loss is not None:
            run_params.update(gamma=p.train.gamma, class_weights=p.train.class_weights)
        optim = make_optimizers(system, p.train.lr, codec_lr=p.train.codec_lr, aux_lr=p.train.aux_lr)
        plan = Plan(system, loss, optim, p.train, run_params)
        return self._on_cached_codes(plan, p, run, data, device, models) if self.cached else plan

    def _codec_loss(self, p, run, codec, task_loss) -> Optional[TacticLoss]:
        return None


class Uncompressed(_TacticMode):
    name = "uncompressed"

    def code(self, system, x, quality, names, measure=True):
        return Coded(x, bits=8 * x.shape[1] * x.shape[2] * x.shape[3] * len(x))


class Jpeg(_TacticMode):
    """Pillow JPEG at `quality`; bpp counts the entropy-coded scan, `bpp_file` the whole file."""
    name, point, style, references = "jpeg", "quality", ("#7f7f7f", "s"), ()
    cached = eight_bit = True

    def points(self, p):
        return p.jpeg.qualities

    def code(self, system, x, quality, names, measure=True):
        images = (x.permute(0, 2, 3, 1) * 255).round().byte().cpu().numpy()
        decoded, file_bytes, scan_bytes = jpeg.roundtrip(images, quality)
        x_hat = torch.from_numpy(decoded).to(x.device).permute(0, 3, 1, 2).float() / 255
        return Coded(x_hat, bits=8 * float(scan_bytes.sum()), decoded=x_hat, bits_file=8 * float(file_bytes.sum()))


class _TacticCodecMode(_TacticMode):
    point, pretrain = "beta", "pretrain"

    def points(self, p):
        return p.betas

    def code(self, system, x, quality, names, measure=True):
        """The TACTIC codec's range coder: one bitstream per image, decoded back to pixels."""
        codec = system.codec
        enc = codec.compress(x, likelihoods=measure)  # not when building training codes
        x_hat = codec.decompress(enc["strings"], enc["shape"])["x_hat"]
        return Coded(x_hat, bits=8 * sum(len(s) for s in enc["strings"][0]), decoded=x_hat,
                     bits_estimated=float(estimated_bpp(enc["likelihoods"], 1)) if measure else None)


class Agnostic(_TacticCodecMode):
    """Task-agnostic: the rate-distortion codec frozen, the task network trained on what it decodes."""
    name, style = "agnostic", ("#1f77b4", "o")
    cached = True


class Aware(_TacticCodecMode):
    """Task-aware (TACTIC): codec and task network trained together, L = lmbda_d L_D + alpha L_T + beta L_R."""
    name, style, references = "aware", ("#d62728", "^"), ("agnostic", "jpeg")

    def _codec_loss(self, p, run, codec, task_loss):
        codec.quantizer = p.model.codec.quantizer
        return TacticLoss(lmbda_d=p.train.lmbda_d, alpha=p.train.alpha, beta=run.beta, task_loss=task_loss)


# -- Compressed-domain modes on the bmshj2018 hyperprior -------------------------------------------

class _LatentMode(Mode):
    point, pretrain, latent = "quality", "pretrain-hyperprior", True

    def points(self, p):
        return p.latent.qualities

    def task_network(self, p, meta, codec=None):
        """cResNet-39 on (y_hat, sigma_hat) packed as one tensor."""
        from tactic.tasks.cresnet import CResNet39

        return LatentHead(CResNet39(codec.M, len(meta["classes"]), weights=p.latent.weights))

    def _setup(self, p, run, meta, models, device):
        codec = self._codec(run, models, device)  # before the task network, as its seeded init expects
        if codec.config.get("quality") != run.quality:
            raise BadFileError(f"the model of stage {run.codec_run.stage}: {run.codec_run.model_path(models)} holds "
                               f"a codec of quality {codec.config.get('quality')}, not {run.quality} (re-run that stage)")
        task = self.task_network(p, meta, codec)
        run_params = {**self._codec_init(run, models), "N": codec.N, "M": codec.M, "task_net": type(task).__name__,
                      "weights_sha256": digest(p.latent.weights)}
        return codec, task, run_params

    def code(self, system, x, quality, names, measure=True):
        """One framed stream per image (bytes counted, framing included), decoded to the latents;
        no pixel decoder runs (the PSNR reported is the codec's, for the report only)."""
        from tactic.codecs.hyperprior import decode_latents, encode

        estimate = system.codec(x) if measure else None  # eval mode: rounded latents, the same the coder writes
        packed = encode(system.codec, x)
        latents = decode_latents(system.codec, packed["streams"], packed["shape"], names)
        return Coded(LatentHead.pack(latents["y_hat"], latents["sigma_hat"]), bits=8 * sum(len(s) for s in packed["streams"]),
                     decoded=estimate["x_hat"] if measure else None,
                     bits_estimated=float(estimated_bpp(estimate["likelihoods"], 1)) if measure else None)


class _FrozenLatentMode(_LatentMode):
    """Codec fixed; the task network trains on what `code` gives (every image entropy coded to its own
    bitstream and decoded back), cached once per image in memory-mapped .npy files."""
    cached = True

    def plan(self, p, run, meta, data, models, device):
        codec, task, run_params = self._setup(p, run, meta, models, device)
        evaluated = System(codec, task, codec_frozen=True, latent=self.latent).to(device)
        plan = Plan(evaluated, TacticLoss(lmbda_d=0.0, alpha=1.0, beta=0.0), make_optimizers(evaluated, p.latent.train.lr),
                    p.latent.train, run_params)
        return self._on_cached_codes(plan, p, run, data, device, models)


class LatentFrozen(_FrozenLatentMode):
    """cResNet-39 on the frozen codec's latents (y_hat, sigma_hat), decoded from real bitstreams."""
    name, style, references = "latent-frozen", ("#2ca02c", "D"), ("pixel-decoded",)


class LatentJoint(_LatentMode):
    """Codec and cResNet-39 trained together: L = alpha * CE + lmbda * MSE + beta * bpp."""
    name, style, references = "latent-joint", ("#9467bd", "v"), ("latent-frozen",)

    def plan(self, p, run, meta, data, models, device):
        codec, task, run_params = self._setup(p, run, meta, models, device)
        cfg = p.latent.train
        codec.quantizer = p.model.codec.quantizer
        system = System(codec, task, latent=True, decode=cfg.lmbda > 0).to(device)
        loss = TacticLoss(lmbda_d=cfg.lmbda, alpha=cfg.alpha, beta=cfg.beta)
        optim = make_optimizers(system, cfg.lr, codec_lr=cfg.codec_lr, aux_lr=cfg.aux_lr)
        return Plan(system, loss, optim, cfg, run_params)


class PixelDecoded(_FrozenLatentMode):
    """ResNet-50 on the frozen codec's decoded pixels, as 8-bit images (what a decoded file holds)."""
    name, style = "pixel-decoded", ("#ff7f0e", "P")
    latent, eight_bit = False, True

    def task_network(self, p, meta, codec=None):
        from tactic.tasks.classifiers import build_classifier

        return build_classifier("resnet50", meta["channels"], len(meta["classes"]), weights=p.latent.weights,
                                weights_param="latent.weights")

    def code(self, system, x, quality, names, measure=True):
        from tactic.codecs.hyperprior import decode_pixels, encode

        estimate = system.codec(x) if measure else None
        packed = encode(system.codec, x)
        x_hat = decode_pixels(system.codec, packed["streams"], packed["shape"], names)["x_hat"]
        x_hat = (x_hat * 255).round() / 255  # 8-bit, as a decoded file would be
        return Coded(x_hat, bits=8 * sum(len(s) for s in packed["streams"]), decoded=x_hat,
                     bits_estimated=float(estimated_bpp(estimate["likelihoods"], 1)) if measure else None)


MODES: dict[str, Mode] = {m.name: m for m in (Uncompressed(), Jpeg(), Agnostic(), Aware(), LatentFrozen(), LatentJoint(),
                                               PixelDecoded())}
