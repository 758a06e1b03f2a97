"""Test-split evaluation of one trained run, with rates from real bitstreams.

- learned codec: every image is entropy coded to its own bitstream with the codec's range coder,
  the bytes are counted (`bpp`), the images are decoded from those bytes and classified; the
  entropy model's estimate is reported beside it (`bpp_estimated`).
- JPEG: every image is written as a JPEG file by Pillow and decoded back; `bpp` counts the
  entropy-coded scan, `bpp_file` the whole file (headers included).
- uncompressed: 8 bits per channel.

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

from tactic import jpeg
from tactic.data import batches, num_batches
from tactic.data.prepared import Split
from tactic.grid import LATENT_MODES, Run
from tactic.losses import bpp as estimated_bpp
from tactic.metrics import psnr
from tactic.system import System
from tactic.train import TaskScores


@torch.no_grad()
def evaluate_system(system: System, run: Run, test: Split, batch_size: int, device, limit: int | None = None,
                    ignore_index: int = 255) -> dict:
    system.eval()
    if run.mode in LATENT_MODES:
        from tactic.models.hyperprior import decode_latents, decode_pixels, encode
    channels = test.images.shape[-1]
    sums = defaultdict(float)
    scores = TaskScores(ignore_index)
    n = 0
    limit_batches = None if limit is None else (limit + batch_size - 1) // batch_size
    for x, y in tqdm(batches(test, batch_size, device, limit_batches=limit_batches), total=num_batches(test, batch_size, limit_batches),
                     desc=f"evaluate {run.key}", file=sys.stderr, disable=None, leave=False):
        pixels = x.shape[2] * x.shape[3]
        if run.mode == "jpeg":
            images = (x.permute(0, 2, 3, 1) * 255).round().byte().cpu().numpy()
            decoded, file_bytes, scan_bytes = jpeg.roundtrip(images, run.quality)
            x_hat = torch.from_numpy(decoded).to(device).permute(0, 3, 1, 2).float() / 255
            sums["bits"] += 8 * float(scan_bytes.sum())
            sums["bits_file"] += 8 * float(file_bytes.sum())
        elif run.mode in LATENT_MODES:
            estimate = system.codec(x)  # eval mode: rounded latents, the same the coder writes
            sums["bits_estimated"] += float(estimated_bpp(estimate["likelihoods"], 1))
            packed = encode(system.codec, x)
            sums["bits"] += 8 * sum(len(s) for s in packed["streams"])  # framing (CRC, length) included
            names = [f"test image {n + i}" for i in range(len(x))]
            if system.latent:  # the classifier reads the decoded latents: no pixel decoder runs
                latents = decode_latents(system.codec, packed["streams"], packed["shape"], names)
                task_input = torch.cat([latents["y_hat"], latents["sigma_hat"]], 1)
                sums["psnr"] += float(psnr(estimate["x_hat"], x).clamp(max=100).sum())  # for the report only
            else:
                task_input = decode_pixels(system.codec, packed["streams"], packed["shape"], names)["x_hat"]
                task_input = (task_input * 255).round() / 255  # 8-bit, as the classifier was trained on
            x_hat = None
        elif system.codec is not None:
            estimate = system.codec(x)  # eval mode: rounded latents, the same the coder writes
            sums["bits_estimated"] += float(estimated_bpp(estimate["likelihoods"], 1))
            enc = system.codec.compress(x)
            sums["bits"] += 8 * sum(len(s) for s in enc["strings"][0])
            x_hat = system.codec.decompress(enc["strings"], enc["shape"])["x_hat"]
        else:
            x_hat = x
            sums["bits"] += 8 * channels * pixels * len(x)
        if run.mode not in LATENT_MODES:
            task_input = x_hat
            if x_hat is not x:
                sums["psnr"] += float(psnr(x_hat, x).clamp(max=100).sum())
        elif not system.latent:
            sums["psnr"] += float(psnr(task_input, x).clamp(max=100).sum())
        if system.task is not None:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
                scores.add(system.task(task_input).float(), y)
        sums["pixels"] += pixels * len(x)
        n += len(x)
    row = {"run": run.key, "mode": run.mode, "seed": run.seed, "beta": run.beta, "quality": run.quality, "num_images": n,
           "bpp": sums["bits"] / sums["pixels"]}
    if "bits_estimated" in sums:
        row["bpp_estimated"] = sums["bits_estimated"] / sums["pixels"]
    if "bits_file" in sums:
        row["bpp_file"] = sums["bits_file"] / sums["pixels"]
    row["psnr"] = sums["psnr"] / n if "psnr" in sums else None
    row.update(scores.result())  # accuracy (top-1, or pixel accuracy), top5, or miou and iou per class
    return row
