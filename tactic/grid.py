"""The experiment grid: every (mode, operating point, seed), and the one place that names their
folders, MLflow runs and DVC stages, so stages, evaluation, the report and flows agree."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tactic.config import Params

# TACTIC modes, then the compressed-domain modes on the bmshj2018 hyperprior (one per quality).
MODES = ("uncompressed", "jpeg", "agnostic", "aware", "latent-frozen", "latent-joint", "pixel-decoded")
CODEC_MODES = ("agnostic", "aware")  # modes whose test images go through the TACTIC codec
LATENT_MODES = ("latent-frozen", "latent-joint", "pixel-decoded")  # modes on a pre-trained hyperprior
PRETRAIN = {"agnostic": "pretrain", "aware": "pretrain", **{m: "pretrain-hyperprior" for m in LATENT_MODES}}


@dataclass(frozen=True)
class Run:
    mode: str  # "pretrain", "pretrain-hyperprior" (codec rate-distortion pre-training) or one of MODES
    seed: int
    beta: Optional[float] = None  # rate weight: pretrain, agnostic, aware (named as DVC names it: repr)
    quality: Optional[int] = None  # jpeg's quality, or the hyperprior's (pretrain-hyperprior, LATENT_MODES)

    @property
    def point(self) -> str:
        """The operating point as a folder name: b<beta>, q<quality>, or '-' for uncompressed."""
        if self.beta is not None:
            return f"b{self.beta!r}"
        if self.quality is not None:
            return f"q{self.quality}"
        return "-"

    @property
    def key(self) -> str:
        parts = [self.mode] + ([self.point] if self.point != "-" else []) + [f"s{self.seed}"]
        return "/".join(parts)

    @property
    def stage(self) -> str:
        """The DVC stage that produces this run (matrix entries are named `<stage>@<v1>-<v2>`)."""
        name = self.mode.replace("-", "_") if self.mode.startswith("pretrain") else f"train_{self.mode.replace('-', '_')}"
        values = [v for v in (self.beta, self.quality) if v is not None] + [self.seed]
        return f"{name}@" + "-".join(repr(v) for v in values)

    def model_dir(self, root: Path | str = "models") -> Path:
        return Path(root) / self.key

    @property
    def codec_run(self) -> Optional["Run"]:
        """The pre-trained rate-distortion codec this run starts from (None for uncompressed, jpeg)."""
        if self.mode not in PRETRAIN:
            return None
        return Run(PRETRAIN[self.mode], self.seed, beta=self.beta, quality=self.quality)


def pretrain_runs(p: Params) -> list[Run]:
    return ([Run("pretrain", s, beta=b) for b in p.betas for s in p.seeds]
            + [Run("pretrain-hyperprior", s, quality=q) for q in p.latent.qualities for s in p.seeds])


def task_runs(p: Params) -> list[Run]:
    runs = [Run("uncompressed", s) for s in p.seeds]
    runs += [Run("jpeg", s, quality=q) for q in p.jpeg.qualities for s in p.seeds]
    runs += [Run(m, s, beta=b) for m in CODEC_MODES for b in p.betas for s in p.seeds]
    runs += [Run(m, s, quality=q) for m in LATENT_MODES for q in p.latent.qualities for s in p.seeds]
    return runs
