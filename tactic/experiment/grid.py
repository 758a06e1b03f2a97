"""The experiment grid: every (mode, operating point, seed), and the one place that names their
folders, MLflow runs and DVC stages, so stages, evaluation, the report and flows agree."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tactic.config import Params
from tactic.experiment.modes import MODES as MODE_TABLE

# The modes, in the order of results and tables (tactic.experiment.modes holds what each one is and does).
MODES = tuple(MODE_TABLE)


@dataclass(frozen=True)
class Run:
    mode: str  # "pretrain", "pretrain-hyperprior" (codec rate-distortion pre-training) or one of MODES
    seed: int
    beta: Optional[float] = None  # rate weight: pretrain, agnostic, aware (named as DVC names it: repr)
    quality: Optional[int] = None  # jpeg's quality, or the hyperprior's (pretrain-hyperprior, the latent modes)

    @classmethod
    def of(cls, mode: str, seed: int, beta: Optional[float] = None, quality: Optional[int] = None) -> "Run":
        """A run of one of MODES, with the operating point its mode takes (beta, quality or none)."""
        point = MODE_TABLE[mode].point
        if (point == "beta") != (beta is not None) or (point == "quality") != (quality is not None):
            raise ValueError("--beta goes with agnostic/aware, --quality with jpeg and the latent modes, "
                             "and each of those needs its own")
        return cls(mode, seed, beta=beta, quality=quality)

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

    def model_path(self, models: Path | str = "models") -> Path:
        """The run's one model file (DVC's output folder is its parent)."""
        return Path(models) / self.key / "model.pt"

    def work_dir(self, models: Path | str = "models") -> Path:
        """Checkpoints and caches of the run: beside, not inside, the models folder, because DVC
        deletes a stage's outputs before it re-runs it, and a resumable checkpoint must survive that."""
        return Path(models).parent / ".checkpoints" / self.key

    @property
    def codec_run(self) -> Optional["Run"]:
        """The pre-trained rate-distortion codec this run starts from (None for uncompressed, jpeg)."""
        pretrain = MODE_TABLE[self.mode].pretrain if self.mode in MODE_TABLE else None
        if pretrain is None:
            return None
        return Run(pretrain, self.seed, beta=self.beta, quality=self.quality)


def pretrain_runs(p: Params) -> list[Run]:
    return ([Run("pretrain", s, beta=b) for b in p.betas for s in p.seeds]
            + [Run("pretrain-hyperprior", s, quality=q) for q in p.latent.qualities for s in p.seeds])


def task_runs(p: Params) -> list[Run]:
    """Every trained run: mode by mode, operating point by point (Mode.points), seed by seed."""
    return [Run(name, s, **({mode.point: v} if mode.point else {}))
            for name, mode in MODE_TABLE.items() for v in mode.points(p) for s in p.seeds]
