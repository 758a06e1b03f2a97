import subprocess
import sys

import pytest
import torch

from tactic.losses import TacticLoss, bpp
from tactic.codecs.codec import TacticCodec


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 64)])
def test_shapes(channels, size):
    codec = TacticCodec(channels, N=8, M=4)
    out = codec(torch.rand(2, channels, size, size))
    assert out["x_hat"].shape == (2, channels, size, size)
    assert out["likelihoods"]["y"].shape == (2, 4, size // 4, size // 4)


def test_size_must_divide():
    with pytest.raises(ValueError, match="multiple of 4"):
        TacticCodec(1, 8, 4)(torch.rand(1, 1, 30, 30))


def test_noise_in_training_rounding_at_inference():
    torch.manual_seed(0)
    codec = TacticCodec(1, 8, 4)
    x = torch.rand(1, 1, 16, 16)
    y = codec.g_a(x)
    codec.train()
    y_noisy = codec.entropy_bottleneck(y)[0]
    assert not torch.equal(y_noisy, y_noisy.round())  # additive uniform noise
    codec.eval()
    y_hat = codec.entropy_bottleneck(y)[0]
    medians = codec.entropy_bottleneck._get_medians()
    assert torch.allclose(y_hat - medians, (y - medians).round())


def test_bitstream_round_trip_matches_inference_forward():
    """Decoding the real bitstream gives exactly the reconstruction of the rounding forward pass,
    and the bytes written are close to the entropy model's estimate."""
    torch.manual_seed(0)
    codec = TacticCodec(1, 8, 4).eval()
    codec.update(force=True)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        ref = codec(x)
        enc = codec.compress(x, likelihoods=True)
        dec = codec.decompress(enc["strings"], enc["shape"])
    assert len(enc["strings"][0]) == 4  # one stream per image
    assert torch.allclose(dec["x_hat"], ref["x_hat"].clamp(0, 1), atol=1e-6)
    # each stream within 2 bytes of what the entropy model says its symbols cost
    ideal = -torch.log2(ref["likelihoods"]["y"]).sum((1, 2, 3)) / 8
    assert all(abs(len(s) - float(b)) <= 2 for s, b in zip(enc["strings"][0], ideal)), ([len(s) for s in enc["strings"][0]], ideal)
    # compress gives the estimate's likelihoods too (evaluate reads them there), the forward pass's own
    assert torch.equal(enc["likelihoods"]["y"], ref["likelihoods"]["y"])


def test_loss_parts():
    x = torch.rand(2, 1, 8, 8)
    out = {"x_hat": x + 0.1, "likelihoods": {"y": torch.full((2, 4, 2, 2), 0.5)}, "logits": torch.zeros(2, 3)}
    parts = TacticLoss(lmbda_d=1.0, alpha=2.0, beta=3.0)(out, x, torch.tensor([0, 1]))
    assert parts["mse_loss"].item() == pytest.approx(0.01, rel=1e-4)
    assert parts["bpp_loss"].item() == pytest.approx(2 * 16 / (2 * 64))  # 1 bit per latent
    assert parts["task_loss"].item() == pytest.approx(torch.log(torch.tensor(3.0)).item())
    assert parts["loss"].item() == pytest.approx(0.01 + 2 * parts["task_loss"].item() + 3 * 0.25, rel=1e-4)


def test_task_weights_load_from_a_local_file(tmp_path):
    from tactic.tasks.classifiers import build_classifier

    src = build_classifier("small-cnn", 1, 10, 8)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    net = build_classifier("small-cnn", 1, 10, 8, weights=str(tmp_path / "w.pt"))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), net.state_dict().values()))
    other = build_classifier("small-cnn", 1, 3, 8, weights=str(tmp_path / "w.pt"))  # another head: kept fresh
    assert other.head.out_features == 3
    with pytest.raises(FileNotFoundError, match="model.task.weights: no such file"):
        build_classifier("small-cnn", 1, 10, 8, weights=str(tmp_path / "missing.pt"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not fit SmallCNN"):
        build_classifier("small-cnn", 1, 10, 8, weights=str(tmp_path / "bad.pt"))
    net18 = build_classifier("resnet18", 3, 5)
    assert net18(torch.rand(1, 3, 64, 64)).shape == (1, 5)


def test_codecs_load_without_compressais_point_cloud_stack():
    """The stage processes skip torch_geometric (seconds each); the codecs must still work."""
    script = ("import sys, torch; from tactic.codecs.codec import TacticCodec; from tactic.codecs.hyperprior import Hyperprior;"
              "m = TacticCodec(1, 8, 4).eval(); m.update(force=True); x = torch.rand(1, 1, 16, 16);"
              "o = m.compress(x); m.decompress(o['strings'], o['shape']);"
              "print('torch_geometric' in sys.modules, 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_latent_relu_is_the_papers_option():
    x = torch.rand(2, 1, 16, 16) - 0.5
    torch.manual_seed(0)
    paper = TacticCodec(1, 8, 4, latent_relu=True)
    torch.manual_seed(0)
    default = TacticCodec(1, 8, 4)
    assert (paper.g_a(x) >= 0).all() and (default.g_a(x) < 0).any()  # the default lets y go negative
    assert TacticCodec(**paper.config).latent_relu and not TacticCodec(**default.config).latent_relu  # saved with the model
    with pytest.raises(ValueError, match="quantizer must be one of"):
        TacticCodec(1, 8, 4, quantizer="round")
