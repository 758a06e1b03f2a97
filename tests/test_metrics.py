import math

import numpy as np
import pytest
import torch

from tactic.metrics import accuracy_at_rate, bd_accuracy, bd_rate, ms_ssim, psnr, rate_at_accuracy, topk_correct, tracked_names


def test_bd_accuracy_constant_offset():
    rate = [0.1, 0.2, 0.4, 0.8]
    acc = [0.5, 0.6, 0.65, 0.7]
    assert bd_accuracy(rate, acc, rate, [a + 0.05 for a in acc]) == pytest.approx(0.05)
    assert bd_accuracy(rate, acc, rate, acc) == pytest.approx(0.0)


def test_bd_accuracy_only_over_the_overlap():
    # B is A shifted right by a factor 2 in rate, both linear in log2(rate) with slope 0.1:
    # at equal rate B is 0.1 less accurate, whatever the range.
    ra = [0.125, 0.25, 0.5, 1.0]
    aa = [0.1 * math.log2(r) + 1 for r in ra]
    rb = [2 * r for r in ra]
    assert bd_accuracy(ra, aa, rb, aa) == pytest.approx(-0.1, abs=1e-9)


def test_bd_accuracy_unsorted_input_and_errors():
    assert bd_accuracy([0.4, 0.1, 0.2], [0.6, 0.4, 0.5], [0.1, 0.4, 0.2], [0.5, 0.7, 0.6]) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="do not overlap"):
        bd_accuracy([0.1, 0.2], [0.5, 0.6], [0.3, 0.4], [0.5, 0.6])
    with pytest.raises(ValueError, match="at least two points"):
        bd_accuracy([0.1], [0.5], [0.1, 0.2], [0.5, 0.6])


def test_topk_and_psnr():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    assert topk_correct(logits, torch.tensor([1, 2]), ks=(1, 2)) == {1: 1, 2: 1}
    assert 5 not in topk_correct(logits, torch.tensor([1, 2]))  # fewer than 5 classes: no top-5
    x = torch.zeros(1, 1, 4, 4)
    assert float(psnr(x + 10 / 255, x)) == pytest.approx(20 * np.log10(25.5), rel=1e-5)  # 10 grey levels off
    assert np.isinf(float(psnr(x, x)))
    # On 8-bit values, as CompressAI: a difference under half a grey level is no difference.
    assert np.isinf(float(psnr(x + 0.4 / 255, x))) and float(psnr(x + 0.6 / 255, x)) == pytest.approx(20 * np.log10(255))


def test_ms_ssim_on_8bit_values_and_only_where_defined():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 176, 176, generator=g)
    assert ms_ssim(x, x).tolist() == pytest.approx([1.0, 1.0])
    noisy = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    worse = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert (ms_ssim(worse, x) < ms_ssim(noisy, x)).all() and (ms_ssim(noisy, x) < 1).all()
    assert ms_ssim(x[..., :160, :160], x[..., :160, :160]) is None  # its coarsest scale would have no 11-px window


def test_pchip_bd_beside_linear():
    # A constant shift in accuracy is the same for any interpolation; pchip follows a curved one more closely.
    r, a = [0.1, 0.2, 0.4, 0.8], [0.5, 0.62, 0.7, 0.74]
    for method in ("linear", "pchip"):
        assert bd_accuracy(r, a, r, [v + 0.05 for v in a], method=method) == pytest.approx(0.05)
        assert bd_rate(r, a, [x / 2 for x in r], a, method=method) == pytest.approx(-50.0)
    assert bd_accuracy([0.1, 0.1, 0.4], [0.5, 0.6, 0.7], r, a, method="pchip") is not None  # a repeated rate is merged
    with pytest.raises(ValueError, match="not monotone"):
        bd_rate(r, [0.5, 0.7, 0.6, 0.75], r, a, method="pchip")
    assert bd_rate(r, [0.5, 0.7, 0.6, 0.75], r, a) is not None  # linear takes the first crossing


def test_mlflow_names_say_what_accuracy_is():
    m = {"accuracy": 0.8, "val_accuracy": 0.7, "top5": 0.9, "val_bpp": 0.2}
    assert tracked_names(m, "classification") == {"top1": 0.8, "val_top1": 0.7, "top5": 0.9, "val_bpp": 0.2}
    assert tracked_names({"accuracy": 0.8, "miou": 0.5}, "segmentation") == {"pixel_accuracy": 0.8, "miou": 0.5}


def test_bd_rate_of_a_curve_shifted_in_rate():
    # B reaches every accuracy at half A's rate: -50 %; A against B: +100 %.
    ra = [0.125, 0.25, 0.5, 1.0]
    acc = [0.5, 0.6, 0.7, 0.8]
    rb = [r / 2 for r in ra]
    assert bd_rate(ra, acc, rb, acc) == pytest.approx(-50.0, abs=1e-6)
    assert bd_rate(rb, acc, ra, acc) == pytest.approx(100.0, abs=1e-6)
    with pytest.raises(ValueError, match="score ranges .* do not overlap"):
        bd_rate(ra, acc, rb, [a + 0.5 for a in acc])


def test_bd_rate_takes_the_first_rate_a_non_monotone_curve_reaches():
    # B dips after its first point: 0.6 is first reached at 0.2 bpp, not after the dip.
    assert rate_at_accuracy([0.2, 0.4, 0.8], [0.6, 0.5, 0.7], 0.6) == pytest.approx(0.2)
    assert rate_at_accuracy([0.2, 0.4, 0.8], [0.6, 0.5, 0.7], 0.65) == pytest.approx(0.4 * 2 ** 0.75)  # 3/4 of the way up, in log rate
    assert rate_at_accuracy([0.2, 0.4], [0.6, 0.5], 0.9) is None


def test_accuracy_at_a_rate_budget():
    rate, acc = [0.1, 0.4], [0.5, 0.7]
    assert accuracy_at_rate(rate, acc, 0.2) == pytest.approx(0.6)  # halfway in log rate
    assert accuracy_at_rate(rate, acc, 1.0) == pytest.approx(0.7)
    assert accuracy_at_rate([0.1, 0.2, 0.4], [0.5, 0.8, 0.6], 0.3) == pytest.approx(0.8)  # the best point within budget
    assert accuracy_at_rate(rate, acc, 0.05) is None  # every point costs more than the budget
