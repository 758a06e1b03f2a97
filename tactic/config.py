"""One schema for params.yaml, validated before any stage does work.

Every stage calls `load_params()` and reads its own block. A wrong or missing value fails with
the dotted key, what was given and what is allowed, e.g.
``params.yaml: train.lr: Input should be greater than 0 (got -1)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat, PositiveInt, ValidationError,
                      field_validator, model_validator)

from tactic.errors import TacticError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = ROOT / "params.yaml"


class _Block(BaseModel):
    # Unknown keys are typos more often than not: refuse them rather than silently ignore.
    model_config = ConfigDict(extra="forbid", frozen=True)


DATASETS = ("fashion-mnist", "minc-2500", "resisc-45", "rsscn7", "imagenet-50", "cityscapes", "fashion-mnist-canvases")
SEGMENTATION_DATASETS = ("cityscapes", "fashion-mnist-canvases")
CLASSIFIERS = ("small-cnn", "resnet18", "resnet50", "inception_v3")
SEGMENTERS = ("small-fcn", "fcn_resnet101")


class PrepareParams(_Block):
    dataset: Literal[DATASETS] = "fashion-mnist"
    root: str = "/usr/share/datasets/fashion-mnist"
    size: Optional[PositiveInt] = None  # shorter side resized to `size`, centre crop size x size; null: as stored
    # Split sizes cap each split (a stratified draw); null: the dataset's default, all of each split for
    # the real datasets, 4000 / 1000 / 2000 for the embedded ones (tactic.data.layouts.EMBEDDED_CAPS).
    train_size: Optional[PositiveInt] = None
    val_size: Optional[PositiveInt] = None
    test_size: Optional[PositiveInt] = None
    # Where a dataset has no official split: the test fraction of all images, then the validation
    # fraction of the rest; where it has no validation split, the fraction of its training split.
    test_fraction: float = Field(0.2, gt=0, lt=1)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    split_seed: int = 0
    split: int = Field(1, ge=1, le=5)  # MINC-2500's official split number
    split_files: Optional[str] = None  # folder with train.txt, test.txt (and val.txt): paths relative to root
    val_root: Optional[str] = None  # imagenet-50: official validation images in WNID folders, used as test split
    classes: Optional[PositiveInt] = None  # the first `classes` classes only (null: all the dataset has)
    strict: bool = False  # stop at the first unreadable image instead of skipping it
    workers: Optional[PositiveInt] = None  # decoding processes (null: one per core)
    # fashion-mnist-canvases (the embedded segmentation set): canvas side and items per canvas (min, max)
    canvas_size: PositiveInt = 64
    canvas_items: tuple[PositiveInt, PositiveInt] = (2, 4)


class CodecParams(_Block):
    N: PositiveInt = 16  # channels of the hidden convolutions
    M: PositiveInt = 8  # channels of the latent y that is entropy coded
    # What the decoder (and the task network behind it) sees in training: "ste", the rounded latents
    # of a real bitstream with a straight-through gradient, or "noise", the paper's uniform-noise proxy.
    # The rate term uses the noise proxy in both. Also the hyperprior's pixel decoder (latent modes).
    quantizer: Literal["ste", "noise"] = "ste"
    # The paper ends the encoder with a ReLU (y >= 0); off by default: it lets the codec die (see TacticCodec).
    latent_relu: bool = False


class TaskParams(_Block):
    task: Literal["classification", "segmentation"] = "classification"
    arch: Literal[CLASSIFIERS + SEGMENTERS] = "small-cnn"
    width: PositiveInt = 16  # small-cnn, small-fcn only
    weights: Optional[str] = None  # optional local state dict for torchvision models; never downloaded

    @model_validator(mode="after")
    def _arch_fits_task(self):
        allowed = CLASSIFIERS if self.task == "classification" else SEGMENTERS
        if self.arch not in allowed:
            raise ValueError(f"arch {self.arch!r} is not a {self.task} network; one of {list(allowed)}")
        return self


class ModelParams(_Block):
    codec: CodecParams = CodecParams()
    task: TaskParams = TaskParams()


class OptimParams(_Block):
    epochs: PositiveInt = 2
    batch_size: PositiveInt = 32
    lr: PositiveFloat = 3e-3
    # "cosine": every learning rate falls from its value to 0 over the run (half a cosine, per step), so
    # the last steps settle; "constant" keeps it. The entropy model's quantile optimiser stays constant.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    limit_batches: Optional[PositiveInt] = None  # cap per epoch, for smoke runs


class PretrainParams(OptimParams):
    aux_lr: PositiveFloat = 1e-3


class TrainParams(OptimParams):
    lmbda_d: float = Field(0.1, ge=0)  # distortion (MSE) weight of the aware mode (params.yaml says why 0.1)
    alpha: float = Field(0.1, ge=0)  # task-loss weight of the aware mode
    gamma: float = Field(1.0, ge=0)  # segmentation: L_T = weighted cross-entropy + gamma * Dice
    class_weights: Optional[list[PositiveFloat]] = None  # segmentation: cross-entropy weight per class
    codec_lr: PositiveFloat = 1e-3  # aware mode: the codec is fine-tuned from its rate-distortion start
    aux_lr: PositiveFloat = 1e-3


class JpegParams(_Block):
    qualities: list[int] = [2, 5, 10, 15, 25, 50]

    @field_validator("qualities")
    @classmethod
    def _in_range(cls, v):
        bad = [q for q in v if not 1 <= q <= 95]
        if bad or len(set(v)) != len(v):
            raise ValueError(f"qualities must be a list of distinct Pillow qualities in 1..95 (empty: no jpeg mode), got {v}")
        return v


class LatentTrainParams(OptimParams):
    lr: PositiveFloat = 1e-3
    codec_lr: PositiveFloat = 1e-4  # latent-joint: the codec is fine-tuned from its rate-distortion start
    aux_lr: PositiveFloat = 1e-3
    # latent-joint: L = alpha * CE + lmbda * MSE (on [0, 1] pixels) + beta * bpp
    alpha: float = Field(1.0, ge=0)
    lmbda: float = Field(0.0, ge=0)
    beta: float = Field(0.0, ge=0)


class LatentParams(_Block):
    """Compressed-domain learning: bmshj2018 scale-hyperprior latents into cResNet-39."""
    qualities: list[int] = []  # CompressAI qualities 1..8; empty: these modes are off
    N: Optional[PositiveInt] = None  # override the quality's (N, M), e.g. for small images; lambda still follows the quality
    M: Optional[PositiveInt] = None
    checkpoint: Optional[str] = None  # start pre-training from a CompressAI checkpoint; `{quality}` is filled in
    weights: Optional[str] = None  # optional local ResNet-50 state dict for cResNet-39 and pixel-decoded
    pretrain: PretrainParams = PretrainParams(lr=1e-4)
    train: LatentTrainParams = LatentTrainParams()

    @field_validator("qualities")
    @classmethod
    def _known(cls, v):
        if any(not 1 <= q <= 8 for q in v) or len(set(v)) != len(v):
            raise ValueError(f"qualities must be distinct CompressAI qualities in 1..8, got {v}")
        return v


class EvaluateParams(_Block):
    batch_size: PositiveInt = 256
    limit: Optional[PositiveInt] = None  # evaluate on the first `limit` test images only (smoke runs)


class ReportParams(_Block):
    title: str = "TACTIC on the embedded benchmark"


class Params(_Block):
    seeds: list[int] = [0, 1, 2]
    betas: list[NonNegativeFloat] = [0.02, 0.1, 0.4, 2.0]
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Optional[PositiveInt] = None  # torch intra-op threads; default: all cores
    prepare: PrepareParams = PrepareParams()
    model: ModelParams = ModelParams()
    pretrain: PretrainParams = PretrainParams()
    train: TrainParams = TrainParams()
    jpeg: JpegParams = JpegParams()
    latent: LatentParams = LatentParams()
    evaluate: EvaluateParams = EvaluateParams()
    report: ReportParams = ReportParams()

    @field_validator("betas", mode="before")
    @classmethod
    def _betas_as_decimals(cls, v):
        # DVC names matrix folders after the YAML text (2 -> "2", 2.0 -> "2.0"); the pipeline names
        # them after the float, so an integer written without ".0" would point to another folder.
        if isinstance(v, list) and any(isinstance(b, int) and not isinstance(b, bool) for b in v):
            raise ValueError(f"write every beta as a decimal (2.0, not 2), got {v}")
        return v

    @model_validator(mode="after")
    def _task_fits_dataset(self):
        seg = self.prepare.dataset in SEGMENTATION_DATASETS
        if seg != (self.model.task.task == "segmentation"):
            raise ValueError(f"model.task.task {self.model.task.task!r} does not fit prepare.dataset {self.prepare.dataset!r} "
                             f"(segmentation datasets: {list(SEGMENTATION_DATASETS)})")
        if self.latent.qualities and self.model.task.task != "classification":
            raise ValueError("latent.qualities: the compressed-domain modes classify; set it to [] for segmentation")
        # 64 is Hyperprior.downsampling (not imported: the schema must not load CompressAI). Checked here
        # too (pretrain_hyperprior checks the prepared images) to fail before `prepare` runs.
        if self.latent.qualities and self.prepare.size and self.prepare.size % 64:
            raise ValueError(f"prepare.size: the hyperprior (latent.qualities) needs a multiple of 64 pixels "
                             f"(its latent is 1/16, its hyper-latent 1/64 of the image), got {self.prepare.size}")
        weights = self.train.class_weights
        if weights is not None and self.model.task.task != "segmentation":
            raise ValueError("train.class_weights is for segmentation only")
        return self

    def weight_files(self) -> dict[str, list[str]]:
        """The files params name, by param: stages that read one depend on its hash (stage `weights`)."""
        lat = self.latent
        return {"model.task.weights": [self.model.task.weights] if self.model.task.weights else [],
                "latent.weights": [lat.weights] if lat.weights and lat.qualities else [],
                "latent.checkpoint": sorted({lat.checkpoint.format(quality=q) for q in lat.qualities}) if lat.checkpoint else []}

    @field_validator("seeds", "betas")
    @classmethod
    def _unique(cls, v, info):
        if len(set(v)) != len(v) or (info.field_name == "seeds" and not v):
            raise ValueError(f"must be a {'non-empty ' if info.field_name == 'seeds' else ''}list without repeats "
                             f"(empty betas: no agnostic/aware modes), got {v}")
        return v


class ParamsError(TacticError):
    """A params file that does not validate: the message names each bad key."""


def format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        if e["loc"]:
            lines.append(f"{source}: {'.'.join(str(p) for p in e['loc'])}: {msg} (got {e.get('input')!r})")
        else:  # a check across keys: its message names them (the input would be the whole file)
            lines.append(f"{source}: {msg}")
    return "\n".join(lines)


def merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` merged in, block by block (as a profile or `dvc exp run -S` would)."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = merged(base.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ParamsError(format_errors(err, source)) from None


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    return parse_params(raw, str(path.name))
