"""Data for phalanx: byte tokenizer, cached token corpora, windows, and the global batch sampler.

Knows nothing about processes: parallelism appears only as "dp rank r of n".
"""

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
from phalanx.data.dataset import TokenWindows, train_val_split
from phalanx.data.sampler import GlobalBatchSampler
from phalanx.data.tokenizer import ByteTokenizer

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
