"""Byte-level tokenizer: no training, no vocabulary file, works on any input."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    """Ids 0..255 are raw bytes; BOS/EOS/PAD follow them.

    Encoded ids are ``uint16`` because 259 ids do not fit in a byte and
    ``uint16`` is also the on-disk dtype of the token files, so encoding a
    corpus needs no further conversion.
    """

    BOS: int = 256
    EOS: int = 257
    PAD: int = 258
    vocab_size: int = 259

    @property
    def bos_id(self) -> int:
        return self.BOS

    @property
    def eos_id(self) -> int:
        return self.EOS

    @property
    def pad_id(self) -> int:
        return self.PAD

    def encode(self, text: str | bytes, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        if isinstance(text, str):
            data = text.encode("utf-8")
        elif isinstance(text, (bytes, bytearray, memoryview)):
            data = bytes(text)
        else:
            raise TypeError(f"ByteTokenizer.encode expects str or bytes, got {type(text).__name__}")
        body = np.frombuffer(data, dtype=np.uint8)
        out = np.empty(len(body) + int(bos) + int(eos), dtype=np.uint16)
        lo = int(bos)
        out[lo : lo + len(body)] = body
        if bos:
            out[0] = self.BOS
        if eos:
            out[-1] = self.EOS
        return out

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        if hasattr(ids, "__array__") or isinstance(ids, (list, tuple)):
            arr = np.asarray(ids)
        else:  # generators and other one-shot iterables
            arr = np.fromiter(ids, dtype=np.int64)
        arr = arr.reshape(-1).astype(np.int64, copy=False)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = arr[(arr < 0) | (arr >= self.vocab_size)][0]
            raise ValueError(
                f"token id {int(bad)} is outside the ByteTokenizer vocabulary "
                f"[0, {self.vocab_size})"
            )
        # Specials carry no text; dropping them lets callers decode raw model
        # output (which contains BOS/EOS/PAD) without pre-filtering.
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"
