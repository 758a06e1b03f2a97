"""CompressAI's entropy models, coding one image at a time without re-sending the whole CDF table.

`EntropyModel.compress` and `decompress` call the range coder once per image and pass it the whole
quantised CDF table every time, as Python lists made from the tensor on each call: for the
hyperprior's Gaussian conditional that is 64 scales x up to ~3,000 entries, most of the time it
takes to code a 64x64 image (without it the round trip is 5.35x faster at (N, M) = (32, 48):
`benchmarks/entropy_coding.py`). Here the table
becomes lists once per table (again whenever `update()` or a checkpoint changes it), each row cut to
its own CDF length (the coder reads no further), and each image is coded with only the rows its
symbols use, indexes renumbered to match. The coder sees the same CDFs for every symbol, so the
bytes are CompressAI's, bit for bit (tests/test_latent_models.py).

Use `EntropyBottleneck` and `GaussianConditional` from here in place of CompressAI's: they are
its classes (isinstance, state dicts and `update()` unchanged) with `_TableCoder` before
`EntropyModel` in their method order, so CompressAI's own `EntropyBottleneck.compress` (medians,
indexes) ends in the coding below.

`FactorizedPrior` is an `EntropyBottleneck` whose streams come from tactic.codecs.rangecoder (same
symbols, same CDFs, ~5 fewer bytes an image): the TACTIC codec's. The hyperprior keeps CompressAI's
rANS bytes, so its streams stay interchangeable with CompressAI's.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from tactic.codecs import _compressai  # noqa: F401  (before compressai: skips its point-cloud imports)
from compressai import entropy_models as cai

from tactic.codecs import rangecoder


class _TableCoder(cai.EntropyModel):
    range_coded = False  # True: tactic.codecs.rangecoder writes the streams, not CompressAI's rANS

    def _cached(self, name: str, make: Callable):
        """`make()` of the CDF table, made again when a buffer changes (update() assigns new tensors,
        load_state_dict copies into them: a new `_version`)."""
        buffers = (self._quantized_cdf, self._cdf_length, self._offset)
        key = [(b, b._version) for b in buffers]  # the tensors themselves: their ids cannot be reused
        cached = self.__dict__.get(name)
        if cached is None or any(a is not b or va != vb for (a, va), (b, vb) in zip(cached[0], key)):
            self.__dict__[name] = cached = (key, make())
        return cached[1]

    def _tables(self) -> tuple[list, list, list, int]:
        """(rows, lengths, offsets) as lists, each row cut to its length, and the entries in all."""
        def make():
            lengths = self._cdf_length.reshape(-1).int().tolist()
            rows = [row[:n] for row, n in zip(self._quantized_cdf.tolist(), lengths)]
            return rows, lengths, self._offset.reshape(-1).int().tolist(), sum(lengths)
        return self._cached("_table_lists", make)

    def _range_table(self) -> rangecoder.Table:
        return self._cached("_range_table_made", lambda: rangecoder.Table.of(
            self._quantized_cdf.cpu().numpy(), self._cdf_length.cpu().numpy(), self._offset.cpu().numpy()))

    def _check_tables(self) -> None:
        self._check_cdf_size()
        self._check_cdf_length()
        self._check_offsets_size()

    def _image_tables(self, indexes: torch.Tensor, rows, lengths, offsets, entries) -> tuple[list, list, list, list]:
        """One image's indexes renumbered over the rows it uses, and those rows; the whole table where
        it is smaller than the image's symbols (a factorized prior's few channels: all of them used)."""
        if entries <= indexes.numel():
            return indexes.reshape(-1).int().tolist(), rows, lengths, offsets
        used, local = torch.unique(indexes.reshape(-1).int(), return_inverse=True)
        used = used.tolist()
        return local.int().tolist(), [rows[u] for u in used], [lengths[u] for u in used], [offsets[u] for u in used]

    def compress(self, inputs: torch.Tensor, indexes: torch.Tensor, means: Optional[torch.Tensor] = None) -> list[bytes]:
        symbols = self.quantize(inputs, "symbols", means)
        if len(inputs.size()) < 2:
            raise ValueError("Invalid `inputs` size. Expected a tensor with at least 2 dimensions.")
        if inputs.size() != indexes.size():
            raise ValueError("`inputs` and `indexes` should have the same size.")
        self._check_tables()
        if self.range_coded:
            flat = lambda t: t.reshape(t.size(0), -1).cpu().numpy()  # noqa: E731
            return rangecoder.encode(flat(symbols), flat(indexes), self._range_table())
        tables = self._tables()
        return [self.entropy_coder.encode_with_indexes(symbols[i].reshape(-1).int().tolist(),
                                                       *self._image_tables(indexes[i], *tables))
                for i in range(symbols.size(0))]

    def decompress(self, strings: list, indexes: torch.Tensor, dtype: torch.dtype = torch.float,
                   means: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(strings, (tuple, list)):
            raise ValueError("Invalid `strings` parameter type.")
        if not len(strings) == indexes.size(0):
            raise ValueError("Invalid strings or indexes parameters")
        if len(indexes.size()) < 2:
            raise ValueError("Invalid `indexes` size. Expected a tensor with at least 2 dimensions.")
        self._check_tables()
        if means is not None:
            if means.size()[:2] != indexes.size()[:2]:
                raise ValueError("Invalid means or indexes parameters")
            if means.size() != indexes.size() and any(means.size(i) != 1 for i in range(2, len(indexes.size()))):
                raise ValueError("Invalid means parameters")
        if self.range_coded:
            values = rangecoder.decode(strings, indexes.reshape(indexes.size(0), -1).cpu().numpy(), self._range_table())
            outputs = torch.from_numpy(values).to(self._quantized_cdf).reshape(indexes.size())
            return self.dequantize(outputs, means, dtype)
        tables = self._tables()
        outputs = self._quantized_cdf.new_empty(indexes.size())
        for i, s in enumerate(strings):
            values = self.entropy_coder.decode_with_indexes(s, *self._image_tables(indexes[i], *tables))
            outputs[i] = torch.tensor(values, device=outputs.device, dtype=outputs.dtype).reshape(outputs[i].size())
        return self.dequantize(outputs, means, dtype)


class EntropyBottleneck(cai.EntropyBottleneck, _TableCoder):
    """CompressAI's factorized prior, coded by `_TableCoder`."""


class GaussianConditional(cai.GaussianConditional, _TableCoder):
    """CompressAI's Gaussian conditional, coded by `_TableCoder`."""


class FactorizedPrior(EntropyBottleneck):
    """The factorized prior with streams of tactic.codecs.rangecoder: the TACTIC codec's, whose
    images are so small that rANS's fixed ~6 bytes an image outweigh their payload."""
    range_coded = True
