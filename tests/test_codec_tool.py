"""`tactic codec compress|decompress`: a trained codec on an image file and back."""
import numpy as np
import pytest
import torch
from PIL import Image

from tactic.codecs import tool
from tactic.codecs.codec import TacticCodec
from tactic.codecs.hyperprior import Hyperprior, decode_pixels, encode
from tactic.experiment.system import System, save_system


def _model(tmp_path, codec, name="model.pt"):
    torch.manual_seed(0)
    path = tmp_path / name
    save_system(path, System(codec=codec), "pretrain/b0.1/s0")
    return path


def _png(tmp_path, h, w, channels):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    path = tmp_path / "in.png"
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(path)
    return path


@pytest.mark.parametrize("kind, h, w", [("tactic", 28, 28), ("tactic", 30, 26), ("hyperprior", 64, 64), ("hyperprior", 70, 50)])
def test_round_trip_is_the_evaluations_reconstruction_bit_for_bit(kind, h, w, tmp_path, capsys):
    torch.manual_seed(0)
    codec = TacticCodec(1, 8, 4) if kind == "tactic" else Hyperprior(1, in_channels=3, N=8, M=12)
    model = _model(tmp_path, codec)
    image = _png(tmp_path, h, w, 1 if kind == "tactic" else 3)
    assert tool.main(["compress", "--model", str(model), str(image), str(tmp_path / "x.tactic")]) == 0
    assert "bpp" in capsys.readouterr().out
    assert tool.main(["decompress", "--model", str(model), str(tmp_path / "x.tactic"), str(tmp_path / "out.png")]) == 0
    # What evaluate does with the same codec and image: its streams, decoded.
    loaded = tool.load(model)
    x = tool.read_image(image, 1 if kind == "tactic" else 3)
    f = tool.unpack((tmp_path / "x.tactic").read_bytes(), "x")
    from_file = tool.decompress(loaded, f["streams"], f["shape"], "x")
    padded = torch.nn.functional.pad(x, (0, -w % loaded.downsampling, 0, -h % loaded.downsampling), mode="replicate")
    if kind == "tactic":
        enc = loaded.compress(padded)
        reference = loaded.decompress(enc["strings"], enc["shape"])["x_hat"]
    else:
        packed = encode(loaded, padded)
        reference = decode_pixels(loaded, packed["streams"], packed["shape"], ["x"])["x_hat"]
    assert torch.equal(from_file, reference)
    decoded = np.asarray(Image.open(tmp_path / "out.png"))
    assert decoded.shape[:2] == (h, w)
    expected = (reference[0, :, :h, :w].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(decoded.reshape(expected.shape), expected)


def test_another_models_file_and_a_damaged_file_are_refused_by_name(tmp_path, capsys):
    torch.manual_seed(0)
    model, other = _model(tmp_path, TacticCodec(1, 8, 4)), _model(tmp_path, TacticCodec(1, 8, 4), "other.pt")
    image = _png(tmp_path, 28, 28, 1)
    tool.main(["compress", "--model", str(model), str(image), str(tmp_path / "x.tactic")])
    capsys.readouterr()
    assert tool.main(["decompress", "--model", str(other), str(tmp_path / "x.tactic"), str(tmp_path / "o.png")]) == 1
    assert f"was written by the model with hash {tool.model_hash(model).hex()}" in capsys.readouterr().err
    data = bytearray((tmp_path / "x.tactic").read_bytes())
    data[40] ^= 0xFF
    (tmp_path / "bad.tactic").write_bytes(bytes(data))
    assert tool.main(["decompress", "--model", str(model), str(tmp_path / "bad.tactic"), str(tmp_path / "o.png")]) == 1
    assert "checksum mismatch" in capsys.readouterr().err and not (tmp_path / "o.png").exists()
