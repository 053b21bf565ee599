"""Data for phalanx: byte tokenizer, cached token corpora, windows, global batch sampler.

Knows nothing about processes: parallelism appears only as "dp rank r of n".

``TokenWindows`` and ``train_val_split`` are imported lazily: they are the only
names needing torch, and processes that just build or check corpus caches
(the controller, spawned cache builders) should not pay torch's import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from phalanx.data.corpus import (
    CorpusInfo,
    build_stdlib_corpus,
    load_user_corpus,
    open_tokens,
    stdlib_sources,
    synthetic_corpus,
    synthetic_entropy_rate_nats,
    unigram_entropy_nats,
)
from phalanx.data.sampler import GlobalBatchSampler
from phalanx.data.tokenizer import ByteTokenizer

if TYPE_CHECKING:
    from phalanx.data.dataset import TokenWindows, train_val_split

__all__ = [
    "ByteTokenizer",
    "CorpusInfo",
    "GlobalBatchSampler",
    "TokenWindows",
    "build_stdlib_corpus",
    "load_user_corpus",
    "open_tokens",
    "stdlib_sources",
    "synthetic_corpus",
    "synthetic_entropy_rate_nats",
    "train_val_split",
    "unigram_entropy_nats",
]

_LAZY = {"TokenWindows", "train_val_split"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from phalanx.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'phalanx.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
