"""The controller prepares the token file once, before any worker starts.

Building it here (not in each worker) means workers only memory-map a finished
file, and a bad data path is a config error with exit code 2, not N tracebacks.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from phalanx.config import ConfigError, RunConfig
from phalanx.data import (
    ByteTokenizer,
    CorpusInfo,
    build_stdlib_corpus,
    load_user_corpus,
    open_tokens,
    synthetic_corpus,
)


def cache_dir(run: RunConfig) -> Path:
    d = run.data.cache_dir or os.environ.get("PHALANX_CACHE") or "~/.cache/phalanx"
    return Path(d).expanduser() / "corpus"


def corpus_to_dict(info: CorpusInfo) -> dict[str, Any]:
    return {**asdict(info), "path": str(info.path)}


def corpus_from_dict(d: dict[str, Any]) -> CorpusInfo:
    return CorpusInfo(**{**d, "path": Path(d["path"])})


def prepare_corpus(run: RunConfig) -> CorpusInfo:
    d, cache = run.data, cache_dir(run)
    try:
        if d.source == "stdlib":
            info = build_stdlib_corpus(cache)
        elif d.source == "synthetic":
            info = synthetic_corpus(cache, num_tokens=d.synthetic_tokens, seed=d.synthetic_seed)
        else:
            info = load_user_corpus(Path(d.path or "").expanduser(), cache,
                                    token_dtype=d.token_dtype)
    except ValueError as e:
        raise ConfigError(f"data: {e}") from e
    tokens = open_tokens(info)
    top = int(np.max(tokens)) if len(tokens) else -1
    vocab = run.model.vocab_size
    if top >= vocab:
        raise ConfigError(
            f"the corpus has token id {top} but model.vocab_size={vocab}; use a model with "
            f"vocab_size >= {top + 1} (the byte tokenizer needs {ByteTokenizer.vocab_size}).")
    return info
