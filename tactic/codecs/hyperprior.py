"""CompressAI's bmshj2018 scale hyperprior, exposing the latents a compressed-domain network reads.

Ballé, Minnen, Singh, Hwang, Johnston: "Variational image compression with a scale hyperprior",
ICLR 2018 (https://arxiv.org/abs/1802.01436); CompressAI's `ScaleHyperprior` ("bmshj2018-hyperprior")
with its quality ladder. On top of CompressAI's model this adds what `CResNet39` needs::

    x ──g_a──> y ──Q──> y_hat ───────────────────────(g_s)──> x_hat     (pixel path, optional)
               │          │
               h_a        GC(sigma_hat) ──> bits(y)
               │          ▲
               z ──Q──> z_hat ──h_s──> sigma_hat
                          │
                          EB ──> bits(z)

    forward(x)                  -> x_hat, likelihoods {y, z}, y_hat, sigma_hat
    forward(x, decode=False)    -> the same without x_hat (g_s is not run)
    compress(x)                 -> CompressAI's {"strings": [y, z], "shape"}
    decompress_latents(s, shp)  -> {"y_hat", "sigma_hat"}: entropy decoding only, g_s is not run
    decompress(s, shp)          -> {"x_hat"} clamped to [0, 1]

Usage::

    from tactic.codecs.hyperprior import Hyperprior, encode, decode_latents, load_hyperprior

    codec = Hyperprior(quality=4)                # (N, M) = (128, 192); lambda = LMBDA[4]
    codec.update(force=True)                     # before any bitstream is written
    packed = encode(codec.eval(), x)             # {"streams": [bytes per image], "shape"}
    lat = decode_latents(codec, packed["streams"], packed["shape"], names)  # y_hat, sigma_hat

    codec = load_hyperprior("bmshj2018-hyperprior-4.pth.tar", quality=4)   # a model.pt or a raw state dict

Training is the pipeline's (tactic.experiment.pretrain_hyperprior): CompressAI's loss and lambda,
lambda * 255^2 * MSE + bpp, through tactic.losses.TacticLoss, and its two optimisers
(tactic.experiment.train.make_optimizers); model files are tactic.experiment.system.save_system's.

Images must be a multiple of 64 pixels high and wide (g_a and h_a downsample 16 x 4); `pad` makes
them so. The published zoo weights are RGB: use `in_channels=3` (repeat grey to 3 channels) to start
from them.

Stream container: CompressAI's range coder does not detect damage: a truncated, bit-flipped or empty
string decodes without error into wrong latents (or, by chance, the right ones). So each image's y and z
strings are framed as `crc32 (4 bytes) | len(y) (LEB128 varint, 1-3 bytes) | y | z`, and decoding
checks the CRC first and names the image whose stream is damaged. The frame costs 5 to 7 bytes per
image: count them in real bpp (they are part of what is stored), and report them on tiny images.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tactic.codecs import _compressai  # noqa: F401  (before compressai: skips its point-cloud imports)
from compressai.models import ScaleHyperprior
from compressai.models.utils import conv, deconv, remap_old_keys
from compressai.ops import compute_padding, quantize_ste
from compressai.zoo.pretrained import load_pretrained

from tactic.errors import TacticError
from tactic.io import BadFileError, load_torch
from tactic.codecs.codec import QUANTIZERS, clamp_ste
from tactic.codecs.entropy import EntropyBottleneck, GaussianConditional

# CompressAI's zoo: lambda per quality for the MSE models (rate-distortion loss lmbda * 255^2 * MSE + bpp).
LMBDA = {1: 0.0018, 2: 0.0035, 3: 0.0067, 4: 0.0130, 5: 0.025, 6: 0.0483, 7: 0.0932, 8: 0.18}
# Entropy-coder state recomputed by update(force=True); its size varies, so it is never shape-checked.
_CODER_BUFFERS = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")


def channels(quality: int) -> tuple[int, int]:
    """(N, M) of the zoo model at `quality`: (128, 192) up to 5, (192, 320) above."""
    if quality not in LMBDA:
        raise TacticError(f"quality must be one of {sorted(LMBDA)}, got {quality!r}")
    return (128, 192) if quality <= 5 else (192, 320)


class Hyperprior(ScaleHyperprior):
    """bmshj2018-hyperprior at a CompressAI quality; also returns y_hat and sigma_hat.

    Args:
        quality (int): 1..8; decides lambda and, unless overridden, (N, M)
        in_channels (int): image channels; 3 keeps CompressAI's layout exactly, another value
            replaces only the first conv of g_a and the last deconv of g_s
        N (int): hidden channels, to override the quality's (tiny smoke-test models)
        M (int): channels of the latent y, likewise
        quantizer (str): what g_s sees in training: "ste" (rounded y, straight-through gradient: the
            values a bitstream decodes to) or "noise" (y + uniform noise, CompressAI's proxy). The
            rate term uses the noise proxy in both. A training setting, not part of `config`.
    """

    arch = "bmshj2018-hyperprior"  # the tag model files carry (tactic.experiment.system.CODECS)
    downsampling = 64  # g_a: 2^4, h_a: 2^2 more; smaller multiples break the z -> sigma_hat shapes

    def __init__(self, quality: int, in_channels: int = 3, N: int | None = None, M: int | None = None,
                 quantizer: str = "ste"):
        n, m = channels(quality)
        super().__init__(N or n, M or m)
        if quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
        self.quality, self.in_channels, self.lmbda, self.quantizer = quality, in_channels, LMBDA[quality], quantizer
        # CompressAI's entropy models as tactic.codecs.entropy's subclasses (coding only differs): re-classed,
        # not rebuilt, so the seeded initialisation draws what it always drew.
        self.entropy_bottleneck.__class__, self.gaussian_conditional.__class__ = EntropyBottleneck, GaussianConditional
        if in_channels != 3:
            self.g_a[0] = conv(in_channels, self.N)
            self.g_s[-1] = deconv(self.N, in_channels)

    @property
    def config(self) -> dict:
        return {"quality": self.quality, "N": self.N, "M": self.M, "in_channels": self.in_channels}

    def _check_size(self, x: torch.Tensor) -> None:
        h, w = x.shape[-2:]
        if h % self.downsampling or w % self.downsampling:
            raise TacticError(f"image size {h}x{w} must be a multiple of {self.downsampling}: pad it (tactic.codecs.hyperprior.pad)")

    def forward(self, x: torch.Tensor, decode: bool = True) -> dict:
        self._check_size(x)
        y = self.g_a(x)
        z = self.h_a(torch.abs(y))
        z_tilde, z_likelihoods = self.entropy_bottleneck(z)
        scales = self._scales(z_tilde)
        # Training: y_tilde = y + uniform noise, CompressAI's differentiable proxy for the rate.
        # Inference: y_tilde = round(y), the symbols a bitstream carries.
        y_tilde, y_likelihoods = self.gaussian_conditional(y, scales)
        out = {"likelihoods": {"y": y_likelihoods, "z": z_likelihoods}}
        out.update(self._task_latents(y, z, y_tilde, scales))
        if decode:
            # g_s sees what it decodes at test time (rounded y) unless the noise proxy is asked for.
            y_dec = out["y_hat"] if self.training and self.quantizer == "ste" else y_tilde
            out["x_hat"] = clamp_ste(self.g_s(y_dec))
        return out

    def _scales(self, z_hat: torch.Tensor) -> torch.Tensor:
        """sigma_hat = h_s(z_hat); outside training one image at a time.

        The scales pick each symbol's CDF, so the decoder must reproduce the encoder's bit for bit.
        A convolution's float result can change in the last bit with the batch size (seen on CPU),
        so batched h_s would tie decoding to the encoder's batching; per image it does not (h_s is
        under 2 % of the codec's work). Training keeps the batched pass: no stream depends on it.
        """
        if self.training:
            return self.h_s(z_hat)
        return torch.cat([self.h_s(z_hat[i:i + 1]) for i in range(z_hat.shape[0])])

    def _task_latents(self, y, z, y_tilde, scales) -> dict:
        """What a compressed-domain network sees: exactly the decoded values, also in training.

        Noise would show the classifier latents it never meets at test time (decoded y_hat are
        integers); straight-through rounding gives it the test-time values while the gradient
        still reaches g_a (and h_a, via sigma_hat) as if rounding were the identity. z is rounded
        around the entropy bottleneck's medians, as its coder does, and h_s re-run on it: h_s is
        small (it works at 1/64 and 1/16 scale), so the extra pass costs little.
        """
        if not self.training:
            return {"y_hat": y_tilde, "sigma_hat": scales}
        medians = self.entropy_bottleneck._get_medians().detach().reshape(1, -1, 1, 1)
        z_hat = quantize_ste(z - medians) + medians
        return {"y_hat": quantize_ste(y), "sigma_hat": self.h_s(z_hat)}

    def compress(self, x: torch.Tensor) -> dict:
        """CompressAI's ScaleHyperprior.compress, with the per-image scales of `_scales`."""
        self._check_size(x)
        y = self.g_a(x)
        z = self.h_a(torch.abs(y))
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.size()[-2:])
        indexes = self.gaussian_conditional.build_indexes(self._scales(z_hat))
        return {"strings": [self.gaussian_conditional.compress(y, indexes), z_strings], "shape": z.size()[-2:]}

    def decompress_latents(self, strings: list, shape) -> dict:
        """Entropy-decode z, then y with the scales h_s(z_hat) gives; the pixel decoder g_s is not run."""
        if not (isinstance(strings, (list, tuple)) and len(strings) == 2):
            raise ValueError("strings must be [y_strings, z_strings], as compress() returns")
        z_hat = self.entropy_bottleneck.decompress(strings[1], shape)
        sigma_hat = self._scales(z_hat)
        indexes = self.gaussian_conditional.build_indexes(sigma_hat)
        y_hat = self.gaussian_conditional.decompress(strings[0], indexes, z_hat.dtype)
        return {"y_hat": y_hat, "sigma_hat": sigma_hat}

    def decompress(self, strings: list, shape) -> dict:
        return {"x_hat": self.g_s(self.decompress_latents(strings, shape)["y_hat"]).clamp_(0, 1)}


def pad(x: torch.Tensor, multiple: int = Hyperprior.downsampling) -> torch.Tensor:
    """Zero-pad (N, C, H, W) images, centred as CompressAI's evaluation does, to a multiple of 64.

    Count bpp over the original H x W: the padding is a transport detail, not image content.
    """
    padding, _ = compute_padding(*x.shape[-2:], min_div=multiple)
    return F.pad(x, padding, mode="constant", value=0)


# -- Bitstreams: one framed stream per image ------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while pos < len(data) and shift < 35:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos
    raise ValueError("length field is cut short")


def pack_stream(y_string: bytes, z_string: bytes) -> bytes:
    """One image's strings in one frame: crc32 | varint len(y) | y | z (crc over everything after it)."""
    body = _varint(len(y_string)) + y_string + z_string
    return zlib.crc32(body).to_bytes(4, "big") + body


def unpack_stream(stream: bytes, name: str = "stream") -> tuple[bytes, bytes]:
    """(y_string, z_string) of a frame; ValueError naming `name` if it is damaged."""
    try:
        if len(stream) < 5:
            raise ValueError(f"{len(stream)} bytes is shorter than the frame header")
        crc, body = int.from_bytes(stream[:4], "big"), bytes(stream[4:])
        if zlib.crc32(body) != crc:
            raise ValueError("checksum mismatch (truncated or corrupted)")
        n, pos = _read_varint(body, 0)
        if pos + n > len(body):
            raise ValueError("y string runs past the end")
        return body[pos:pos + n], body[pos + n:]
    except ValueError as err:
        raise TacticError(f"{name}: bitstream does not decode ({err})") from None


@torch.no_grad()
def encode(model: Hyperprior, x: torch.Tensor) -> dict:
    """{"streams": one framed bytes per image, "shape": z's (h, w), shared by the batch}.

    Decode on the same device type as the encoder: the scales come from float convolutions,
    and a one-ulp difference on another device picks another CDF and garbles the stream.
    """
    out = model.compress(x)
    y_strings, z_strings = out["strings"]
    return {"streams": [pack_stream(y, z) for y, z in zip(y_strings, z_strings)], "shape": tuple(out["shape"])}


def _unpack_all(streams: Sequence[bytes], names: Sequence[str]) -> list:
    if len(names) != len(streams):
        raise ValueError(f"{len(streams)} streams but {len(names)} names")
    pairs = [unpack_stream(s, n) for s, n in zip(streams, names)]
    return [[y for y, _ in pairs], [z for _, z in pairs]]


def _decode(fn, strings, shape, names):
    try:
        return fn(strings, shape)
    except Exception as err:  # the coder's own errors carry no image name
        raise TacticError(f"{', '.join(names)}: bitstream does not decode ({type(err).__name__}: {err})") from err


@torch.no_grad()
def decode_latents(model: Hyperprior, streams: Sequence[bytes], shape, names: Sequence[str]) -> dict:
    """{"y_hat", "sigma_hat"} of framed streams, no pixel decoding; a damaged stream names its image."""
    return _decode(model.decompress_latents, _unpack_all(streams, names), shape, names)


@torch.no_grad()
def decode_pixels(model: Hyperprior, streams: Sequence[bytes], shape, names: Sequence[str]) -> dict:
    """{"x_hat"} of framed streams (the pixel path); a damaged stream names its image."""
    return _decode(model.decompress, _unpack_all(streams, names), shape, names)


# -- Checkpoints ----------------------------------------------------------------------------------

def _describe(cfg: dict) -> str:
    return f"{Hyperprior.arch} quality {cfg['quality']} (N={cfg['N']}, M={cfg['M']}, in_channels={cfg['in_channels']})"


def _describe_raw(state: dict) -> str:
    """What a raw state dict's tensors say: N, M and in_channels, and the qualities with that (N, M)."""
    def size(key, dim):
        return state[key].shape[dim] if key in state and state[key].dim() > dim else "?"
    n, m, c = size("g_a.0.weight", 0), size("g_a.6.weight", 0), size("g_a.0.weight", 1)
    fits = [q for q in LMBDA if channels(q) == (n, m)]
    qualities = f", the geometry of qualities {fits[0]}-{fits[-1]}" if fits else ""
    return f"a state dict with N={n}, M={m}, in_channels={c}{qualities}"


def _weights(state: dict) -> dict:
    """The state without the coder tables, which update(force=True) rebuilds (their size varies)."""
    return {k: v for k, v in state.items() if not k.endswith(_CODER_BUFFERS)}


def _mismatch(state: dict, own: dict) -> list[str]:
    """Keys missing, unexpected or of another shape."""
    theirs, ours = _weights(state), _weights(own)
    bad = [f"missing {k}" for k in ours if k not in theirs]
    bad += [f"unexpected {k}" for k in theirs if k not in ours]
    bad += [f"{k} {tuple(theirs[k].shape)} != {tuple(v.shape)}" for k, v in ours.items()
            if k in theirs and theirs[k].shape != v.shape]
    return bad


def _raw_state(obj: dict) -> dict:
    """A zoo or CompressAI training state dict under today's key names."""
    state = load_pretrained(obj.get("state_dict", obj))  # strips "module.", old bottleneck names
    return remap_old_keys("entropy_bottleneck", state)


def load_hyperprior(path, quality: int, in_channels: int = 3, N: int | None = None, M: int | None = None) -> Hyperprior:
    """A Hyperprior from a model file of ours (a `pretrain_hyperprior` stage's model.pt) or a raw
    CompressAI state dict (the zoo's files), CDFs updated.

    Ours must match quality, N, M and in_channels exactly. A raw state dict carries no quality, so
    only its geometry can be checked: zoo weights of another quality with the same (N, M) load (a
    deliberate starting point); another geometry or architecture fails, naming both.
    """
    file = Path(path)
    model = Hyperprior(quality, in_channels, N, M)
    want = _describe(model.config)
    obj = load_torch(file, "latent.checkpoint")
    if not isinstance(obj, dict):
        raise BadFileError(f"latent.checkpoint: {file} holds a {type(obj).__name__}, not a state dict; the codec is {want}")
    codec = obj.get("codec")
    if isinstance(codec, dict) and "arch" in codec:  # tactic.experiment.system.save_system's format
        held = {k: codec["config"].get(k) for k in model.config}
        if codec["arch"] != Hyperprior.arch or held != model.config:
            raise BadFileError(f"latent.checkpoint: {file} holds {codec['arch']} quality {held['quality']} (N={held['N']}, "
                               f"M={held['M']}, in_channels={held['in_channels']}) but the codec is {want}")
        state, held = codec["state"], f"{file} holds {_describe(held)}"
    else:
        state, held = _raw_state(obj), f"{file} holds {_describe_raw(obj.get('state_dict', obj))}"
    bad = _mismatch(state, model.state_dict())
    if bad:
        raise BadFileError(f"latent.checkpoint: {held} but the codec is {want}: {'; '.join(bad[:4])}")
    # nn.Module's loader, not CompressionModel's: that one resizes the coder tables we leave out.
    torch.nn.Module.load_state_dict(model, _weights(state), strict=False)
    model.update(force=True)
    return model
