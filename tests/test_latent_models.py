"""The compressed-domain models: bmshj2018 hyperprior latents and cResNet-39 (CPU, seconds)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tactic.tasks.cresnet import CResNet39
from tactic.codecs.hyperprior import (
    LMBDA, Hyperprior, channels, decode_latents, decode_pixels, encode, load_hyperprior, pad,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random images: structure at several scales, like photos, unlike white noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 8, size // 8, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def _coding_model(quality: int = 1, **kw) -> Hyperprior:
    """An untrained codec whose latents span many integers (untrained g_a rounds almost all to 0)."""
    torch.manual_seed(0)
    model = Hyperprior(quality, **kw).eval()
    with torch.no_grad():
        model.g_a[-1].weight.mul_(40)
    model.update(force=True)
    return model


@pytest.mark.parametrize("quality", [1, 4, 8])
def test_shapes_for_every_quality(quality):
    torch.manual_seed(0)
    codec = Hyperprior(quality).eval()
    N, M = channels(quality)
    assert (codec.N, codec.M) == (N, M) and codec.lmbda == {1: 0.0018, 4: 0.0130, 8: 0.18}[quality]
    x = _images(1)
    with torch.no_grad():
        out = codec(x)
        latent = codec(x, decode=False)
        logits = CResNet39(M, num_classes=10).eval()(out["y_hat"], out["sigma_hat"])
    assert out["x_hat"].shape == x.shape
    assert out["y_hat"].shape == out["sigma_hat"].shape == (1, M, 4, 4)
    assert out["likelihoods"]["y"].shape == (1, M, 4, 4) and out["likelihoods"]["z"].shape == (1, N, 1, 1)
    assert "x_hat" not in latent and torch.equal(latent["y_hat"], out["y_hat"])
    assert logits.shape == (1, 10)


def test_grey_input_replaces_only_the_outer_layers():
    codec = Hyperprior(1, in_channels=1, N=8, M=12)
    assert codec.g_a[0].in_channels == 1 and codec.g_s[-1].out_channels == 1
    assert codec(torch.rand(2, 1, 64, 64))["x_hat"].shape == (2, 1, 64, 64)


def test_sizes_must_be_multiples_of_64_and_pad_makes_them():
    codec = Hyperprior(1, N=8, M=12)
    with pytest.raises(ValueError, match="28x28 must be a multiple of 64"):
        codec(torch.rand(1, 3, 28, 28))
    x = pad(torch.rand(1, 3, 28, 28))
    assert x.shape[-2:] == (64, 64) and codec(x)["x_hat"].shape == x.shape


def test_bitstream_round_trip_returns_exactly_the_encoder_latents():
    codec = _coding_model()
    x = _images(3)
    with torch.no_grad():
        ref = codec(x, decode=False)
        y = codec.g_a(x)
    packed = encode(codec, x)
    names = ["a.png", "b.png", "c.png"]
    lat = decode_latents(codec, packed["streams"], packed["shape"], names)
    assert ref["y_hat"].unique().numel() > 5, "latents too trivial for the test to mean anything"
    assert torch.equal(lat["y_hat"], torch.round(y)) and torch.equal(lat["y_hat"], ref["y_hat"])
    assert torch.equal(lat["sigma_hat"], ref["sigma_hat"])
    # Decoding must not depend on how the encoder batched the images (batched h_s differs in the last bit).
    parts = [decode_latents(codec, packed["streams"][i:j], packed["shape"], names[i:j]) for i, j in ((0, 1), (1, 3))]
    for key in ("y_hat", "sigma_hat"):
        assert torch.equal(torch.cat([p[key] for p in parts]), lat[key]), key
    pixels = decode_pixels(codec, packed["streams"], packed["shape"], names)["x_hat"]
    with torch.no_grad():
        assert torch.equal(pixels, codec.g_s(lat["y_hat"]).clamp(0, 1))


def test_streams_are_compressais_bytes_and_follow_a_changed_table():
    """tactic.codecs.entropy codes with each image's rows of the CDF table, made into lists once:
    the hyperprior's bytes (Gaussian conditional, bottleneck of z) and decoded latents must be what
    CompressAI's own classes give; the TACTIC codec's range-coded streams (bottleneck of y) decode to
    CompressAI's latents in fewer bytes; both still after `update()` or a checkpoint has changed the
    table the lists (or arrays) were made from."""
    from compressai import entropy_models as cai
    from tactic.codecs.codec import TacticCodec

    def coded(codec, x):
        if isinstance(codec, Hyperprior):
            packed = encode(codec, x)
            return packed["streams"], decode_latents(codec, packed["streams"], packed["shape"], [str(i) for i in range(len(x))])["y_hat"]
        enc = codec.compress(x)
        return enc["strings"][0], codec.decompress(enc["strings"], enc["shape"])["x_hat"]

    def both(codec, x):
        """(streams, decoded) with tactic's entropy models, then with CompressAI's (the same modules re-classed)."""
        models = [m for m in (codec.entropy_bottleneck, getattr(codec, "gaussian_conditional", None)) if m is not None]
        ours = [type(m) for m in models]
        out = [coded(codec, x)]
        try:
            for m in models:
                m.__class__ = cai.GaussianConditional if isinstance(m, cai.GaussianConditional) else cai.EntropyBottleneck
            out.append(coded(codec, x))
        finally:
            for m, cls in zip(models, ours):
                m.__class__ = cls
        return out

    hyper = _coding_model(N=32, M=48)
    torch.manual_seed(1)
    tactic = TacticCodec(3, 8, 4).eval()
    with torch.no_grad():
        tactic.g_a[-2].weight.mul_(40)
    tactic.update(force=True)
    def same(a, b, codec):
        (streams, decoded), (theirs, theirs_decoded) = a, b
        assert torch.equal(decoded, theirs_decoded)
        if codec is hyper:
            assert streams == theirs
        else:
            assert sum(map(len, streams)) < sum(map(len, theirs))

    for codec, x in ((hyper, _images(3)), (tactic, _images(3, size=28))):
        first = both(codec, x)
        same(*first, codec)
        # a table changed by training and update(), then one a checkpoint brings: the lists follow
        with torch.no_grad():
            codec.entropy_bottleneck.quantiles.add_(0.5)
        codec.update(force=True)
        second = both(codec, x)
        same(*second, codec)
        ours, ours2 = first[0][0], second[0][0]
        assert ours2 != ours
        state = {k: v.clone() for k, v in codec.state_dict().items()}
        with torch.no_grad():
            codec.entropy_bottleneck.quantiles.sub_(0.5)
        codec.update(force=True)
        codec.load_state_dict(state)
        assert both(codec, x)[0][0] == ours2


def test_a_damaged_bitstream_names_its_image():
    codec = _coding_model()
    packed = encode(codec, _images(2))
    good, stream = packed["streams"]
    damaged = {
        "truncated": stream[: len(stream) // 2],
        "bit-flipped": stream[:-1] + bytes([stream[-1] ^ 0x01]),
        "empty": b"",
    }
    for kind, bad in damaged.items():
        with pytest.raises(ValueError, match=r"shoe_0042\.png: bitstream does not decode") as err:
            decode_latents(codec, [good, bad], packed["shape"], ["coat_0001.png", "shoe_0042.png"])
        assert "coat_0001.png" not in str(err.value), kind
    with pytest.raises(ValueError, match="2 streams but 1 names"):
        decode_latents(codec, [good, stream], packed["shape"], ["coat_0001.png"])


def _save(path, codec):
    """As the pretrain_hyperprior stage saves its codec."""
    from tactic.experiment.system import System, save_system

    save_system(path, System(codec=codec), "pretrain-hyperprior/q1/s0")


def test_checkpoint_round_trip(tmp_path):
    codec = _coding_model(1, N=8, M=12)
    path = tmp_path / "codec.pt"
    _save(path, codec)
    loaded = load_hyperprior(path, 1, N=8, M=12).eval()
    for k, v in codec.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = _images(2)
    assert encode(loaded, x)["streams"] == encode(codec, x)["streams"]


def test_checkpoint_of_another_quality_names_both(tmp_path):
    path = tmp_path / "q1.pt"
    _save(path, Hyperprior(1))
    with pytest.raises(ValueError, match=r"quality 1 \(N=128, M=192.*the codec is bmshj2018-hyperprior quality 8 \(N=192, M=320"):
        load_hyperprior(path, 8)
    with pytest.raises(ValueError, match=r"quality 1 .*quality 4"):  # same (N, M): ours still says which quality
        load_hyperprior(path, 4)
    with pytest.raises(ValueError, match=r"in_channels=3\).*in_channels=1\)"):
        load_hyperprior(path, 1, in_channels=1)


def test_raw_compressai_state_dict_loads_and_a_mismatch_names_both(tmp_path):
    from compressai.models import FactorizedPrior, ScaleHyperprior

    torch.manual_seed(1)
    zoo = ScaleHyperprior(128, 192).state_dict()
    # The zoo's files use CompressAI's older bottleneck names ("_matrices.0"); the loader renames them.
    old_names = {k.replace("entropy_bottleneck.matrices.", "entropy_bottleneck._matrices."): v for k, v in zoo.items()}
    for i, obj in enumerate([zoo, {"state_dict": zoo}, old_names]):
        torch.save(obj, tmp_path / f"raw{i}.pth")
        loaded = load_hyperprior(tmp_path / f"raw{i}.pth", quality=4)
        assert torch.equal(loaded.g_a[0].weight, zoo["g_a.0.weight"])
        assert torch.equal(loaded.entropy_bottleneck.matrices[0], zoo["entropy_bottleneck.matrices.0"])
        assert loaded.entropy_bottleneck._quantized_cdf.numel() > 0  # update(force=True) ran
    with pytest.raises(ValueError, match=r"N=128, M=192, in_channels=3, the geometry of qualities 1-5 .*quality 8 \(N=192, M=320"):
        load_hyperprior(tmp_path / "raw0.pth", quality=8)
    torch.save(FactorizedPrior(128, 192).state_dict(), tmp_path / "factorized.pth")
    with pytest.raises(ValueError, match=r"but the codec is bmshj2018-hyperprior quality 1 .*missing h_a"):
        load_hyperprior(tmp_path / "factorized.pth", quality=1)


def test_training_latents_are_integers_and_pass_the_task_gradient_to_the_encoder():
    torch.manual_seed(0)
    codec = Hyperprior(1, N=8, M=12).train()
    net = CResNet39(12, num_classes=3).train()
    x, labels = _images(4), torch.tensor([0, 1, 2, 0])
    out = codec(x, decode=False)
    assert torch.equal(out["y_hat"], out["y_hat"].round()), "straight-through latents are the decoded integers"
    F.cross_entropy(net(out["y_hat"], out["sigma_hat"]), labels).backward()
    assert codec.g_a[0].weight.grad.abs().sum() > 0  # through y_hat, straight through the rounding
    assert codec.h_a[0].weight.grad.abs().sum() > 0  # through sigma_hat
    assert codec.entropy_bottleneck.quantiles.grad is None  # the task never moves the coder's quantiles


def test_rate_distortion_training_lowers_the_loss():
    """The pretrain_hyperprior stage's loss (CompressAI's: lambda * 255^2 * MSE + bpp) and optimisers."""
    from tactic.losses import TacticLoss
    from tactic.experiment.system import System
    from tactic.experiment.train import make_optimizers

    torch.manual_seed(0)
    codec = Hyperprior(8, N=8, M=12).train()
    opt, aux = make_optimizers(System(codec=codec), 1e-2, aux_lr=1e-2)
    loss = TacticLoss(lmbda_d=LMBDA[8] * 255**2, alpha=0.0, beta=1.0)
    x = _images(4)
    losses = []
    for _ in range(20):  # straight-through rounding (the default) needs a few more steps than noise here
        parts = loss(codec(x), x, None)
        assert {"mse_loss", "bpp_loss", "loss"} <= set(parts)
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
        aux.zero_grad()
        codec.aux_loss().backward()
        aux.step()
        losses.append(parts["loss"].item())
    assert min(losses[-3:]) < 0.7 * losses[0], losses


def test_cresnet39_layout_and_local_weights(tmp_path):
    import torchvision.models as tvm

    torch.manual_seed(0)
    resnet = tvm.resnet50(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "resnet50.pth")
    net = CResNet39(192, num_classes=5, weights=str(tmp_path / "resnet50.pth"))
    convs = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d) and n.startswith("layer") and "downsample" not in n]
    assert len(convs) == 39
    assert not hasattr(net, "layer1") and not hasattr(net, "conv1")
    assert torch.equal(net.layer3[2].conv2.weight, resnet.layer3[2].conv2.weight)
    assert net.fc.out_features == 5
    shapes = []
    net.layer4.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(output.shape)))
    net.eval()(torch.zeros(1, 192, 4, 4), torch.ones(1, 192, 4, 4))
    assert shapes == [(1, 2048, 2, 2)]  # H/32 for a 64x64 image
    with pytest.raises(ValueError, match="needs sigma_hat"):
        net(torch.zeros(1, 192, 4, 4))
    assert CResNet39(192, 5, sigma=False).eval()(torch.zeros(1, 192, 4, 4)).shape == (1, 5)
