import numpy as np
import pytest

from tactic.codecs import jpeg
from tactic.data import fashion_mnist


@pytest.fixture(scope="module")
def images(fmnist_root):
    return fashion_mnist.load(fmnist_root, "test")[0][:50]


def test_scan_is_the_entropy_coded_part(images):
    data = jpeg.encode(images[0], 50)
    scan = jpeg.scan_size(data)
    assert 0 < scan < len(data)
    assert data[-2:] == b"\xff\xd9"
    # Tables and headers alone (quality 50, grey) take hundreds of bytes; a 28x28 scan much less.
    assert len(data) - scan > 300


def test_rate_grows_with_quality(images):
    rates = [jpeg.roundtrip(images, q)[2].sum() for q in (2, 10, 50)]
    assert rates[0] < rates[1] < rates[2]


def test_roundtrip_rgb_and_grey():
    rng = np.random.default_rng(0)
    for shape in ((3, 16, 16, 1), (3, 16, 16, 3)):
        imgs = rng.integers(0, 255, shape, dtype=np.uint8)
        decoded, file_bytes, scan_bytes = jpeg.roundtrip(imgs, 95)
        assert decoded.shape == imgs.shape and (scan_bytes < file_bytes).all()


def test_malformed():
    with pytest.raises(ValueError, match="malformed"):
        jpeg.scan_size(b"\xff\xd8\x00\x00")
