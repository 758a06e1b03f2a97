"""Behaviour, not ranges: these fail when the codec or the task-aware training is broken.

A small fixed fixture (1000 Fashion-MNIST images, a few hundred optimiser steps per model) that trains in
seconds; every rate is counted from real bitstreams."""
import numpy as np
import pytest
import torch

from tactic.config import merged, parse_params
from tactic.data import batches
from tactic.data.prepared import load_split
from tactic.experiment.run import evaluate_run, pretrain_codec, train_task
from tactic.experiment.grid import Run
from tactic.metrics import accuracy_at_rate, psnr
from tactic.codecs.codec import TacticCodec
from tactic.experiment.system import load_codec

from tests.helpers import TINY, repo_params

LOW, HIGH = 0.03, 0.3  # rate weights: a mid and a low rate operating point of the default profile
COLLAPSE = 1.0  # where agnostic falls apart on this fixture (~52 % at 0.106 bpp, 64 % at 0.156 with HIGH)
SEEDS = (0, 1)  # one seed's margin moves by several points between machines (CPU kernels): the mean of two
DEFAULT = repo_params({})  # the shipped training recipe (schedules, aware's loss weights), on less data
LEARN = merged(TINY, {
    # The margins above were measured on CPU kernels; on an H200 (CUDA, bf16 task network) seeds 0/1 gave
    # +0.7/+1.2 points, inside the same seed noise: the fixture pins the device so it tests the method alike everywhere.
    "device": "cpu",
    "betas": [LOW, HIGH, COLLAPSE], "seeds": list(SEEDS),
    "prepare": {"train_size": 1000, "val_size": 200, "test_size": 400},
    "model": {"codec": {"N": 16, "M": 8}, "task": {"width": 16}},
    "pretrain": {"epochs": 4, "batch_size": 16, "lr_schedule": DEFAULT["pretrain"]["lr_schedule"]},
    "train": {"epochs": 3, "batch_size": 16, **{k: DEFAULT["train"][k] for k in ("lr_schedule", "lmbda_d", "alpha")}},
})

# One worker runs them all (`--dist loadgroup`): the module's codecs (~21 s) are trained once, not on each worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("codec_learns")]


@pytest.fixture(scope="module")
def learn(tmp_path_factory, fmnist_root):
    """Prepared data and the codecs pre-trained at every rate weight, for each seed."""
    from tactic.data.prepare import prepare

    p = parse_params(LEARN)
    root = tmp_path_factory.mktemp("learn")
    data, models = root / "prepared", root / "models"
    prepare(p.prepare, data)
    for seed in p.seeds:
        for beta in p.betas:
            pretrain_codec(p, Run("pretrain", seed, beta=beta), data, models)
    return p, data, models


def _real_bpp_and_psnr(codec, data):
    test = load_split(data, "test")
    bits, db, n = 0, 0.0, 0
    with torch.no_grad():
        for x, _ in batches(test, 100, "cpu"):
            enc = codec.compress(x)
            bits += 8 * sum(len(s) for s in enc["strings"][0])
            db += float(psnr(codec.decompress(enc["strings"], enc["shape"])["x_hat"], x).sum())
            n += len(x)
    h, w = test.images.shape[1:3]
    return bits / (n * h * w), db / n


def test_larger_beta_lowers_the_real_rate_and_psnr_beats_the_mean_image(learn):
    p, data, models = learn
    low = _real_bpp_and_psnr(load_codec(models / Run("pretrain", 0, beta=LOW).key / "model.pt")[0], data)
    high = _real_bpp_and_psnr(load_codec(models / Run("pretrain", 0, beta=HIGH).key / "model.pt")[0], data)
    assert high[0] < 0.8 * low[0], (low, high)  # bpp
    test = torch.from_numpy(np.asarray(load_split(data, "test").images, np.float32) / 255)
    mean_image = test.mean(0, keepdim=True).expand_as(test)
    mean_psnr = float(psnr(mean_image.flatten(1), test.flatten(1)).mean())  # ~11 dB on Fashion-MNIST
    # A collapsed codec decodes one constant image (~9.8 dB here), below the mean image.
    assert low[1] > mean_psnr + 4 and high[1] > mean_psnr + 1 and low[1] > high[1], (mean_psnr, low, high)


def test_aware_beats_agnostic_at_matched_rate(learn):
    """At a low rate the frozen rate-distortion codec keeps too little for the classifier; the
    task-aware codec spends its bits on what the task needs (the paper's finding). Compared at
    matched real rate: `aware` at HIGH against `agnostic`'s curve read at `aware`'s rate (log-linear
    between the agnostic points that bracket it), by more than a point in the mean over two seeds.
    Measured when written, on one machine (seed 0): aware 63.2 % at 0.135 bpp, agnostic 51.8 % at
    0.106 and 64.2 % at 0.156, so 59.5 % at 0.135 (+3.7); on another (AMD EPYC), seed 0: aware 60.75 %
    at 0.079 against 61.2 % read off agnostic's curve (-0.4), seed 1: 61.5 % at 0.088 against 57.4 %
    (+4.1), seed 2 (not run here) +2.2: aware at lmbda_d 1, alpha 0.3 (the earlier recipe) sat on the
    agnostic curve."""
    p, data, models = learn
    margins, summary = [], {}
    for seed in p.seeds:
        rows = {}
        for mode, beta in (("agnostic", COLLAPSE), ("agnostic", HIGH), ("agnostic", LOW), ("aware", HIGH)):
            run = Run(mode, seed, beta=beta)
            train_task(p, run, data, models)
            rows[mode, beta] = evaluate_run(p, run, data, models, "cpu")
        aware = rows["aware", HIGH]
        rates, accs = zip(*[(rows["agnostic", b]["bpp"], rows["agnostic", b]["accuracy"]) for b in (COLLAPSE, HIGH, LOW)])
        summary[seed] = {k: (round(r["bpp"], 4), r["accuracy"]) for k, r in rows.items()}
        assert min(rates) < aware["bpp"] < max(rates), summary  # inside agnostic's rate range: a matched-rate reading
        margins.append(aware["accuracy"] - accuracy_at_rate(rates, accs, aware["bpp"]))
    assert np.mean(margins) > 0.01, (margins, summary)


@pytest.mark.parametrize("arch", ["tactic", "hyperprior"])
def test_training_reconstruction_is_the_rounded_one_of_test_time(arch):
    """Straight-through quantisation: in training the decoder (and the task net behind it) sees exactly
    the reconstruction the bitstream decodes to at test time, while the rate still uses noisy latents."""
    from tactic.codecs.hyperprior import Hyperprior

    torch.manual_seed(0)
    codec = TacticCodec(1, 8, 4) if arch == "tactic" else Hyperprior(1, 1, N=8, M=8)
    x = torch.rand(2, 1, 64, 64, requires_grad=True)
    codec.train()
    trained = codec(x)
    trained["x_hat"].sum().backward()
    assert x.grad.abs().sum() > 0  # gradients pass the rounding
    codec.eval()
    with torch.no_grad():
        tested = codec(x)
    assert torch.allclose(trained["x_hat"], tested["x_hat"], atol=1e-6)
    assert not torch.allclose(trained["likelihoods"]["y"], tested["likelihoods"]["y"])  # rate from noise
    codec.quantizer = "noise"  # the paper's proxy, kept as an option: training sees noisy latents
    codec.train()
    assert not torch.allclose(codec(x)["x_hat"], tested["x_hat"], atol=1e-4)
