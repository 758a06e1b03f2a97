"""Test-split evaluation of one trained run, with rates from real bitstreams.

- learned codec: every image is entropy coded to its own bitstream with the codec's range coder,
  the bytes are counted (`bpp`), the images are decoded from those bytes and classified; the
  entropy model's estimate is reported beside it (`bpp_estimated`).
- JPEG: every image is written as a JPEG file by Pillow and decoded back; `bpp` counts the
  entropy-coded scan, `bpp_file` the whole file (headers included).
- uncompressed: 8 bits per channel.
- PSNR and MS-SSIM of every decoded image on its 8-bit values, averaged over images, as CompressAI
  reports them (MS-SSIM only for images of at least 161 pixels a side).

- compressed-domain modes (bmshj2018 hyperprior): every image coded to its own framed stream
  (bytes counted, framing included); latent modes classify the latents decoded from the streams
  without running the pixel decoder (their PSNR is the codec's, for the report), pixel-decoded
  classifies the decoded 8-bit pixels.

Classification reports top-1 (`accuracy`) and top-5; segmentation reports pixel accuracy (as
`accuracy`), mean IoU (`miou`) and IoU per class (`iou`), from one confusion matrix over the split.
"""
from __future__ import annotations

import sys
from collections import defaultdict

import torch
from tqdm import tqdm

from tactic.data import batches, num_batches
from tactic.data.prepared import Split
from tactic.experiment.grid import Run
from tactic.metrics import TaskScores, ms_ssim, psnr
from tactic.experiment.modes import MODES
from tactic.experiment.system import System


@torch.no_grad()
def evaluate_system(system: System, run: Run, test: Split, batch_size: int, device, limit: int | None = None,
                    ignore_index: int = 255) -> dict:
    """One row of results/eval.json: what the task network scores on what `run`'s mode shows it of
    the test split after a real round trip (tactic.experiment.modes: `code`), with the rate that cost."""
    system.eval()
    mode = MODES[run.mode]
    sums = defaultdict(float)
    scores = TaskScores(ignore_index)
    n = 0
    limit_batches = None if limit is None else (limit + batch_size - 1) // batch_size
    for x, y in tqdm(batches(test, batch_size, device, limit_batches=limit_batches), total=num_batches(test, batch_size, limit_batches),
                     desc=f"evaluate {run.key}", file=sys.stderr, disable=None, leave=False):
        coded = mode.code(system, x, run.quality, [f"test image {n + i}" for i in range(len(x))])
        sums["bits"] += coded.bits
        for key, value in (("bits_estimated", coded.bits_estimated), ("bits_file", coded.bits_file)):
            if value is not None:
                sums[key] += value
        if coded.decoded is not None:
            sums["psnr"] += float(psnr(coded.decoded, x).clamp(max=100).sum())  # identical images: 100 dB, not inf
            similarity = ms_ssim(coded.decoded, x)
            if similarity is not None:
                sums["msssim"] += float(similarity.sum())
        if system.task is not None:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
                scores.add(system.task(coded.task_input).float(), y)
        sums["pixels"] += x.shape[2] * x.shape[3] * len(x)
        n += len(x)
    row = {"run": run.key, "mode": run.mode, "seed": run.seed, "beta": run.beta, "quality": run.quality, "num_images": n,
           "bpp": sums["bits"] / sums["pixels"]}
    if "bits_estimated" in sums:
        row["bpp_estimated"] = sums["bits_estimated"] / sums["pixels"]
    if "bits_file" in sums:
        row["bpp_file"] = sums["bits_file"] / sums["pixels"]
    row["psnr"] = sums["psnr"] / n if "psnr" in sums else None
    row["msssim"] = sums["msssim"] / n if "msssim" in sums else None
    row.update(scores.result())  # accuracy (top-1, or pixel accuracy), top5, or miou and iou per class
    return row
