"""Pillow JPEG as the classical baseline, with honest sizes from the real files.

On small images the JPEG headers (quantisation and Huffman tables) dominate the file, so two
sizes are reported: the whole file, and the entropy-coded scan alone (from the byte after the
SOS segment header to the EOI marker). Codecs are compared on the scan size, which favours JPEG.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def scan_size(data: bytes) -> int:
    """Bytes of entropy-coded data: everything after the SOS header up to (not including) EOI."""
    pos = 2  # after SOI
    while pos < len(data):
        if data[pos] != 0xFF:
            raise ValueError("malformed JPEG: expected a marker")
        marker = data[pos + 1]
        seg_len = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xDA:  # SOS: the scan runs from the end of this header to EOI
            start = pos + 2 + seg_len
            end = data.rindex(b"\xff\xd9")
            return end - start
        pos += 2 + seg_len
    raise ValueError("malformed JPEG: no SOS marker")


def encode(image: np.ndarray, quality: int) -> bytes:
    """(H, W, C) uint8 -> JPEG file bytes (baseline, Pillow's default 4:2:0 for RGB)."""
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode(data: bytes, channels: int) -> np.ndarray:
    pil = Image.open(io.BytesIO(data))
    arr = np.asarray(pil.convert("L" if channels == 1 else "RGB"))
    return arr[..., None] if channels == 1 else arr


def roundtrip(images: np.ndarray, quality: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode and decode a (N, H, W, C) uint8 batch; returns (decoded, file bytes, scan bytes)."""
    decoded = np.empty_like(images)
    file_bytes = np.empty(len(images), dtype=np.int64)
    scan_bytes = np.empty(len(images), dtype=np.int64)
    for i, image in enumerate(images):
        data = encode(image, quality)
        decoded[i] = decode(data, images.shape[-1])
        file_bytes[i], scan_bytes[i] = len(data), scan_size(data)
    return decoded, file_bytes, scan_bytes
