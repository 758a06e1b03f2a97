"""A trained codec as a tool: an image file to a bitstream file and back.

    tactic codec compress   --model models/aware/b0.4/s0/model.pt shirt.png shirt.tactic
    tactic codec decompress --model models/aware/b0.4/s0/model.pt shirt.tactic shirt.decoded.png

Works with every model file that holds a codec (the TACTIC codec of pretrain/agnostic/aware, the
bmshj2018 hyperprior of pretrain_hyperprior and the latent modes). The bitstream file is

    b"TACT" | version (1) | sha256 of the model file (16 bytes) | image height, width, channels and
    the padded height, width (uint16 each) | the codec's latent shape (uint16 count, then each) |
    stream count (uint16) | per stream: length (uint32), bytes | crc32 of everything before (uint32)

so a file decoded with another model is refused, naming both hashes, and a damaged file is refused
before decoding. The streams are the ones `evaluate` counts: decompressing gives its reconstruction
bit for bit (before the 8-bit PNG). An image whose sides are not a multiple of the codec's
downsampling is padded (edge pixels repeated) and cropped back after decoding.
"""
from __future__ import annotations

import argparse
import hashlib
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tactic.errors import TacticError
from tactic.io import atomic_path

# 2: the TACTIC codec's streams are range coded (tactic/codecs/rangecoder.py), no longer rANS.
MAGIC, VERSION = b"TACT", 2


def model_hash(path: Path) -> bytes:
    return hashlib.sha256(Path(path).read_bytes()).digest()[:16]


def load(path: Path):
    from tactic.experiment.system import load_codec

    return load_codec(path, "cpu", what="--model")[0].eval()


def read_image(path: Path, channels: int) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            pixels = np.asarray(im)
    except OSError as err:
        raise TacticError(f"{path}: not an image Pillow can read ({err})") from None
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255


@torch.no_grad()
def compress(codec, x: torch.Tensor) -> tuple[list[bytes], tuple, tuple]:
    """(streams, latent shape, padded size) of one image (1, C, H, W) in [0, 1]."""
    h, w = x.shape[-2:]
    m = codec.downsampling
    x = F.pad(x, (0, -w % m, 0, -h % m), mode="replicate") if (h % m or w % m) else x
    if codec.arch == "bmshj2018-hyperprior":
        from tactic.codecs.hyperprior import encode

        packed = encode(codec, x)
        return list(packed["streams"]), tuple(packed["shape"]), tuple(x.shape[-2:])
    enc = codec.compress(x)
    return [s for strings in enc["strings"] for s in strings], tuple(enc["shape"]), tuple(x.shape[-2:])


@torch.no_grad()
def decompress(codec, streams: list[bytes], shape: tuple, name: str) -> torch.Tensor:
    """The reconstruction (1, C, padded H, padded W) that `evaluate` gets from these streams."""
    if codec.arch == "bmshj2018-hyperprior":
        from tactic.codecs.hyperprior import decode_pixels

        return decode_pixels(codec, streams, shape, [name])["x_hat"]
    return codec.decompress([[s] for s in streams], shape)["x_hat"]


def pack(model: bytes, size: tuple, padded: tuple, channels: int, shape: tuple, streams: list[bytes]) -> bytes:
    body = MAGIC + bytes([VERSION]) + model + struct.pack("<5H", size[0], size[1], channels, *padded)
    body += struct.pack("<H", len(shape)) + struct.pack(f"<{len(shape)}H", *shape) + struct.pack("<H", len(streams))
    body += b"".join(struct.pack("<I", len(s)) + s for s in streams)
    return body + struct.pack("<I", zlib.crc32(body))


def unpack(data: bytes, name: str) -> dict:
    if len(data) < 4 + 1 + 16 + 10 + 2 + 4 or data[:4] != MAGIC:
        raise TacticError(f"{name}: not a tactic bitstream file")
    if data[4] != VERSION:
        raise TacticError(f"{name}: bitstream version {data[4]}, this tactic reads {VERSION}")
    body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
    if zlib.crc32(body) != crc:
        raise TacticError(f"{name}: checksum mismatch (truncated or damaged)")
    model, at = body[5:21], 21
    h, w, channels, ph, pw = struct.unpack_from("<5H", body, at)
    at += 10
    (n,) = struct.unpack_from("<H", body, at)
    shape = struct.unpack_from(f"<{n}H", body, at + 2)
    at += 2 + 2 * n
    (count,) = struct.unpack_from("<H", body, at)
    at += 2
    streams = []
    for _ in range(count):
        (length,) = struct.unpack_from("<I", body, at)
        streams.append(body[at + 4:at + 4 + length])
        at += 4 + length
    return {"model": model, "size": (h, w), "padded": (ph, pw), "channels": channels, "shape": tuple(shape),
            "streams": streams}


def write_png(path: Path, x: torch.Tensor) -> None:
    from PIL import Image

    pixels = (x[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tactic codec", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["compress", "decompress"])
    ap.add_argument("--model", type=Path, required=True, help="a model.pt that holds a codec")
    ap.add_argument("input", type=Path)
    ap.add_argument("output", type=Path)
    args = ap.parse_args(argv)
    try:
        codec = load(args.model)
        if args.action == "compress":
            x = read_image(args.input, codec.config["in_channels"])
            streams, shape, padded = compress(codec, x)
            data = pack(model_hash(args.model), tuple(x.shape[-2:]), padded, x.shape[1], shape, streams)
            with atomic_path(args.output) as tmp:
                tmp.write_bytes(data)
            h, w = x.shape[-2:]
            print(f"{args.output}: {len(data)} bytes, {8 * len(data) / (h * w):.4f} bpp ({h}x{w}, {codec.arch})")
        else:
            f = unpack(args.input.read_bytes(), str(args.input))
            if f["model"] != model_hash(args.model):
                raise TacticError(f"{args.input} was written by the model with hash {f['model'].hex()}, "
                                  f"--model {args.model} has {model_hash(args.model).hex()}")
            x = decompress(codec, f["streams"], f["shape"], str(args.input))[..., :f["size"][0], :f["size"][1]]
            write_png(args.output, x)
            print(f"{args.output}: {f['size'][0]}x{f['size'][1]}")
    except (TacticError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
