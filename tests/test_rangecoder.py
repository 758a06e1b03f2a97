"""The range coder (tactic.codecs.rangecoder) on tables like CompressAI's: exact round trips with
escapes and carries, streams within 2 bytes of the model's cost, damage kept to its own stream."""
import numpy as np
import pytest

from tactic.codecs import rangecoder
from tactic.codecs.rangecoder import BYPASS, PRECISION, Table, decode, encode


def _table(rng, lengths=(3, 5, 20, 60, 130)) -> tuple[Table, list]:
    """Rows of 16-bit CDFs (every symbol at least 1 of 2^16, the last one the escape), as CompressAI
    quantises them, and their pmfs."""
    rows, pmfs = [], []
    for n in lengths:
        freq = np.maximum(1, np.round(rng.dirichlet(np.full(n - 1, 0.3)) * (1 << PRECISION) * 0.99)).astype(np.int64)
        freq[np.argmax(freq)] += (1 << PRECISION) - freq.sum()
        rows.append(np.concatenate([[0], np.cumsum(freq)]))
        pmfs.append(freq / (1 << PRECISION))
    cdf = np.zeros((len(rows), max(lengths)), np.int64)
    for i, row in enumerate(rows):
        cdf[i, :len(row)] = row
    return Table.of(cdf, lengths, rng.integers(-10, 1, len(rows))), pmfs


def _sample(rng, table, pmfs, indexes) -> tuple[np.ndarray, np.ndarray]:
    """Symbols drawn from their rows (the escape replaced by values below, at and far above the row),
    and each image's cost in bits under the model: the symbol's, plus 4 bits a bypass symbol."""
    symbols, bits = np.empty(indexes.shape, np.int64), np.zeros(len(indexes))
    for (i, j), r in np.ndenumerate(indexes):
        top = len(pmfs[r]) - 1
        v = rng.choice(top + 1, p=pmfs[r])
        bits[i] += -np.log2(pmfs[r][v])
        if v == top:
            v = int(rng.choice([-rng.integers(1, 300), top, top + rng.integers(1, 1 << 20)]))
            raw = -2 * v - 1 if v < 0 else 2 * (v - top)
            count = (raw.bit_length() + BYPASS - 1) // BYPASS
            bits[i] += BYPASS * (count // 15 + 1 + count)
        symbols[i, j] = v + table.offsets[r]
    return symbols, bits


@pytest.mark.parametrize("shared", [True, False], ids=["a row per position", "a row per symbol"])
def test_round_trip_is_exact_and_within_two_bytes_of_the_models_cost(monkeypatch, shared):
    rng = np.random.default_rng(0)
    table, pmfs = _table(rng)
    images, n = 60, 150
    indexes = (np.tile(rng.integers(0, 5, n), (images, 1)) if shared else rng.integers(0, 5, (images, n)))
    symbols, bits = _sample(rng, table, pmfs, indexes)
    carries = []
    carry = rangecoder._Encoder._carry
    monkeypatch.setattr(rangecoder._Encoder, "_carry", lambda self, lanes: (carries.append(len(lanes)), carry(self, lanes)))
    streams = encode(symbols, indexes, table)
    assert carries  # the carry path ran (and the round trip below checks it)
    assert (decode(streams, indexes, table) == symbols).all()
    sizes = np.array([len(s) for s in streams])
    assert (np.abs(sizes - bits / 8) <= 2).all(), (sizes - bits / 8).max()


def test_the_likeliest_symbols_cost_nothing_and_empty_input_codes():
    rng = np.random.default_rng(1)
    table, _ = _table(rng)
    indexes = np.zeros((3, 40), np.int64)
    symbols = np.full((3, 40), table.offsets[0])  # symbol 0: the CDF's first interval, starting at 0
    streams = encode(symbols, indexes, table)
    assert streams == [b"", b"", b""] and (decode(streams, indexes, table) == symbols).all()
    assert encode(np.zeros((0, 5), np.int64), np.zeros((0, 5), np.int64), table) == []


def test_a_damaged_stream_decodes_to_something_and_leaves_the_others_alone():
    rng = np.random.default_rng(2)
    table, pmfs = _table(rng)
    indexes = rng.integers(0, 5, (3, 100))
    symbols, _ = _sample(rng, table, pmfs, indexes)
    streams = encode(symbols, indexes, table)
    for damaged in (streams[1][:3], bytes(rng.integers(0, 256, 400, dtype=np.uint8)), b"\xff" * 50):
        out = decode([streams[0], damaged, streams[2]], indexes, table)
        assert (out[[0, 2]] == symbols[[0, 2]]).all()
