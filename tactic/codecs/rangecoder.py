"""A byte-wise range coder for CompressAI's quantised CDF tables, many images at once.

CompressAI's rANS coder writes 32-bit words and ends every stream with its 64-bit state: at least
8 bytes an image whatever it holds, 0.08 bpp on a 28x28 image, more than the whole payload of the
default profile's lowest-rate codecs. This coder writes bytes and ends a stream with the fewest
bytes that pin the final interval (a decoder reads zeros past the end, so the trailing zero bytes
are dropped as well): under a byte over the entropy model's own estimate instead of ~6
(benchmarks/entropy_coding.py measures both).

It codes the same symbols with the same model as CompressAI's `encode_with_indexes`: the table row
of each symbol by its index, 16-bit CDFs, the row's last symbol as the escape to values outside it,
followed by their magnitude in 4-bit bypass symbols (its count first, in runs of 15). Only the
arithmetic coder differs: an LZMA-style range coder (32-bit range, carries propagated into the bytes
already written), run on every image of a batch in step, one numpy operation per symbol position
across the batch instead of a Python call per image.

    encode(symbols, indexes, table) -> list[bytes]        symbols, indexes: (images, symbols) ints
    decode(streams, indexes, table) -> symbols
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

PRECISION = 16  # bits of CompressAI's quantised CDFs
BYPASS = 4  # bits of an escaped value's bypass symbols (CompressAI's)
_MASK, _TOP = np.uint64(0xFFFFFFFF), np.uint64(1 << 24)


class Table(NamedTuple):
    """CompressAI's CDF table as arrays: row r holds `lengths[r]` entries, padded past them with a value
    above any target; `offsets[r]` is the symbol of entry 0."""
    cdf: np.ndarray  # (rows, longest) int64
    lengths: np.ndarray  # (rows,) int64
    offsets: np.ndarray  # (rows,) int64

    @classmethod
    def of(cls, quantized_cdf, cdf_length, offset) -> "Table":
        cdf = np.asarray(quantized_cdf, dtype=np.int64).copy()
        lengths = np.asarray(cdf_length, dtype=np.int64).reshape(-1)
        cdf[np.arange(cdf.shape[1])[None] >= lengths[:, None]] = 1 << (PRECISION + 1)
        return cls(cdf, lengths, np.asarray(offset, dtype=np.int64).reshape(-1))


class _Encoder:
    """The coder's state for every lane (image) at once, its bytes in one flat buffer, `room` per lane."""

    def __init__(self, lanes: int, room: int):
        self.low = np.zeros(lanes, np.uint64)
        self.rng = np.full(lanes, _MASK, np.uint64)
        # int32, not bytes: a carry is added to the last byte written and passed on to the bytes before
        # it only in `finish` (addition commutes, and nothing writes below a lane's position again)
        self.out = np.zeros(lanes * room + 2, np.int32)  # +2: the unused bytes `put` writes past the last lane
        self.room = room
        self.base = np.arange(lanes, dtype=np.int64) * room
        self.pos = self.base.copy()  # where each lane writes next

    def _carry(self, lanes: np.ndarray) -> None:
        """Add 1 to the number the bytes of `lanes` written so far make."""
        self.out[self.pos[lanes] - 1] += 1  # a lane at most once: `lanes` are distinct

    def _resolve_carries(self) -> None:
        """Bytes again: each lane's excess over 0xFF passed on to the byte before, last byte first."""
        lanes = self.out[:-2].reshape(len(self.pos), self.room)
        for k in range(int((self.pos - self.base).max(initial=0)) - 1, 0, -1):
            lanes[:, k - 1] += lanes[:, k] >> 8
            lanes[:, k] &= 0xFF

    def put(self, start: np.ndarray, freq: np.ndarray, bits: int, lanes=slice(None)) -> None:
        """One symbol per lane: the interval [start, start + freq) of 2^bits."""
        r = self.rng[lanes] >> np.uint64(bits)
        low = self.low[lanes] + r * start
        rng = r * freq
        if (over := low > _MASK).any():
            self._carry(np.arange(len(self.low))[lanes][over])
            low &= _MASK
        # rng >= 2^8 after a symbol of >= 2^-16: 0, 1 or 2 bytes out, written always, kept as counted
        shifts = (rng < _TOP).astype(np.uint64) + (rng < np.uint64(1 << 16))
        pos = self.pos[lanes]
        self.out[pos] = (low >> np.uint64(24)).astype(np.uint8)
        self.out[pos + 1] = (low >> np.uint64(16)).astype(np.uint8)
        self.pos[lanes] = pos + shifts.astype(np.int64)
        bits_out = shifts << np.uint64(3)
        self.low[lanes] = (low << bits_out) & _MASK
        self.rng[lanes] = rng << bits_out

    def finish(self) -> list[bytes]:
        """The fewest bytes k (0..4) whose value v, read with zeros after it, lies in [low, low + rng)."""
        low, top = self.low, self.low + self.rng
        k = np.full(len(low), 4)
        v = low.copy()
        for n in (3, 2, 1, 0):
            unit = np.uint64(1 << (32 - 8 * n))
            cand = (low + unit - np.uint64(1)) // unit * unit
            fits = cand < top
            k, v = np.where(fits, n, k), np.where(fits, cand, v)
        if (over := v > _MASK).any():
            self._carry(np.flatnonzero(over))
        v &= _MASK
        for j in range(4):
            sel = np.flatnonzero(k > j)
            self.out[self.pos[sel]] = (v[sel] >> np.uint64(24 - 8 * j)).astype(np.uint8)
            self.pos[sel] += 1
        self._resolve_carries()
        out = self.out.astype(np.uint8)
        streams = []
        for b, e in zip(self.base.tolist(), self.pos.tolist()):
            streams.append(out[b:e].tobytes().rstrip(b"\0"))  # a decoder reads zeros past the end
        return streams


def _escapes(values: np.ndarray, top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CompressAI's escape of a value outside [0, top): the raw magnitude it codes, and how many
    bypass symbols that takes."""
    raw = np.where(values < 0, -2 * values - 1, 2 * (values - top))
    count = np.zeros_like(raw)
    while (rest := raw >> (BYPASS * count)).any():
        count += rest != 0
    return raw, count


def _bypass_symbols(raw: int, count: int) -> list[int]:
    """The bypass symbols after an escape: `count` in runs of 15, then `raw` 4 bits at a time."""
    run = [15] * (count // 15) + [count % 15]
    return run + [(raw >> (BYPASS * j)) & 15 for j in range(count)]


def encode(symbols: np.ndarray, indexes: np.ndarray, table: Table) -> list[bytes]:
    """One stream per row of `symbols` (images, n), each symbol coded with the table row its index names."""
    symbols, indexes = np.asarray(symbols, np.int64), np.asarray(indexes, np.int64)
    lanes, n = symbols.shape
    values = symbols - table.offsets[indexes]
    top = table.lengths[indexes] - 2  # the escape symbol
    escaped = (values < 0) | (values >= top)
    coded = np.where(escaped, top, values)
    start = table.cdf[indexes, coded]
    freq = (table.cdf[indexes, coded + 1] - start).astype(np.uint64)
    start = start.astype(np.uint64)
    raw, count = _escapes(np.where(escaped, values, top), top)
    bypassed = (count + count // 15 + 1) * escaped  # bypass symbols: a byte at most each
    enc = _Encoder(lanes, 2 * n + int(bypassed.sum(1).max(initial=0)) + 8)
    escapes = escaped.any(0)
    for j in range(n):
        enc.put(start[:, j], freq[:, j], PRECISION)
        if escapes[j]:  # rare: one lane at a time
            for i in np.flatnonzero(escaped[:, j]):
                for b in _bypass_symbols(int(raw[i, j]), int(count[i, j])):
                    enc.put(np.uint64(b), np.uint64(1), BYPASS, lanes=np.array([i]))
    return enc.finish()


class _Decoder:
    def __init__(self, streams: list[bytes]):
        room = max(map(len, streams), default=0) + 6  # zeros past each stream's end, as its encoder assumed
        self.buf = np.zeros(len(streams) * room, np.uint8)
        for i, s in enumerate(streams):
            self.buf[i * room:i * room + len(s)] = np.frombuffer(s, np.uint8)
        self.end = np.arange(1, len(streams) + 1, dtype=np.int64) * room - 2  # the last place a read of 2 may start
        self.pos = self.end - room + 2
        b = self.buf.astype(np.uint64)
        p = self.pos
        self.code = (b[p] << np.uint64(24)) | (b[p + 1] << np.uint64(16)) | (b[p + 2] << np.uint64(8)) | b[p + 3]
        self.pos += 4
        self.rng = np.full(len(streams), _MASK, np.uint64)

    def target(self, bits: int, lanes=slice(None)) -> tuple[np.ndarray, np.ndarray]:
        r = self.rng[lanes] >> np.uint64(bits)
        return r, np.minimum(self.code[lanes] // r, np.uint64((1 << bits) - 1)).astype(np.int64)

    def take(self, r: np.ndarray, start: np.ndarray, freq: np.ndarray, lanes=slice(None)) -> None:
        code = self.code[lanes] - r * start.astype(np.uint64)
        rng = r * freq.astype(np.uint64)
        shifts = (rng < _TOP).astype(np.uint64) + (rng < np.uint64(1 << 16))
        pos = np.minimum(self.pos[lanes], self.end[lanes])  # a damaged stream reads zeros, never another's bytes
        two = (self.buf[pos].astype(np.uint64) << np.uint64(8)) | self.buf[pos + 1]
        self.code[lanes] = (((code << np.uint64(16)) | two) >> ((np.uint64(2) - shifts) << np.uint64(3))) & _MASK
        self.rng[lanes] = rng << (shifts << np.uint64(3))
        self.pos[lanes] = pos + shifts.astype(np.int64)

    def bypass(self, lane: int) -> int:
        lanes = np.array([lane])
        r, t = self.target(BYPASS, lanes)
        self.take(r, t, np.ones(1, np.int64), lanes)
        return int(t[0])


def decode(streams: list[bytes], indexes: np.ndarray, table: Table) -> np.ndarray:
    """The symbols (images, n) that `encode` wrote to `streams` with these `indexes`."""
    indexes = np.asarray(indexes, np.int64)
    lanes, n = indexes.shape
    dec = _Decoder(streams)
    every = np.arange(lanes)
    shared = bool((indexes == indexes[:1]).all())  # a factorized prior: one row per position for all images
    out = np.empty((lanes, n), np.int64)
    for j in range(n):
        rows = indexes[:, j]
        top = table.lengths[rows] - 2
        r, t = dec.target(PRECISION)
        if shared:
            row = table.cdf[rows[0]]
            s = np.minimum(np.searchsorted(row, t, side="right") - 1, top)
            start, end = row[s], row[s + 1]
        else:
            cdf = table.cdf[rows]
            s = np.minimum((cdf <= t[:, None]).sum(1) - 1, top)
            start, end = cdf[every, s], cdf[every, s + 1]
        dec.take(r, start, end - start)
        for i in np.flatnonzero(s == top):  # escapes: rare, one lane at a time
            count = run = dec.bypass(i)
            while run == 15:
                run = dec.bypass(i)
                count += run
            raw = sum(dec.bypass(i) << (BYPASS * k) for k in range(count)) & 0xFFFFFFFF  # more only from damage
            s[i] = -(raw >> 1) - 1 if raw & 1 else (raw >> 1) + top[i]
        out[:, j] = s + table.offsets[rows]
    return out
