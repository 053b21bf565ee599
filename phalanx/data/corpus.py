"""Token corpora as flat on-disk token files (nanoGPT style: no header).

Every corpus ends up as one ``.bin`` file of little-endian unsigned ints that
is memory-mapped by all workers, so a corpus is tokenized once per machine
and shared through the page cache instead of once per process.

Cache files are keyed by a digest of their inputs' metadata (paths, sizes,
mtimes, or generator arguments), so a cache hit costs a few ``stat`` calls
and no re-read, and written atomically (temp file + ``os.replace``) because
several workers on a host start at once and race to build the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phalanx.data.tokenizer import ByteTokenizer

__all__ = [
    "CorpusInfo",
    "build_stdlib_corpus",
    "load_user_corpus",
    "open_tokens",
    "stdlib_sources",
    "synthetic_corpus",
    "synthetic_entropy_rate_nats",
    "unigram_entropy_nats",
]

# Bump to invalidate every cached token file when the layout/derivation changes.
_FORMAT = 1
_EXCLUDED_PARTS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages"})
_DTYPES = ("uint8", "uint16", "uint32")
_READ_CHUNK = 16 << 20
_EOS = np.array([ByteTokenizer.EOS], dtype=np.uint16)

# Synthetic corpus shape: a sparse order-2 Markov chain over a small alphabet.
_SYNTH_ALPHABET = 16
_SYNTH_FANOUT = 4


@dataclass(frozen=True)
class CorpusInfo:
    """Where a token file lives and what is in it.

    ``sha256`` is the hex digest of the token file's bytes: runs can record it
    so a resumed or compared run can prove it trained on the same data.
    """

    path: Path
    num_tokens: int
    sha256: str
    dtype: str
    source: str = "stdlib"


def _np_dtype(name: str) -> np.dtype:
    # Fixed little-endian so the same corpus has the same bytes (and sha256)
    # on every machine; on little-endian hosts this is the native dtype.
    return np.dtype(name).newbyteorder("<")


def _key(obj: object) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _fingerprint(files: list[Path], root: Path) -> list[tuple[str, int, int]]:
    out = []
    for p in files:
        st = p.stat()
        out.append((p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return out


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_tokens_atomic(
    path: Path, chunks: Iterable[np.ndarray], dtype: str, expected: int
) -> str:
    """Stream ``chunks`` to ``path`` atomically; return the sha256 of the bytes."""
    npdt = _np_dtype(dtype)
    h = hashlib.sha256()
    count = 0
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                buf = np.ascontiguousarray(chunk, dtype=npdt).data
                f.write(buf)
                h.update(buf)
                count += len(chunk)
            f.flush()
            # fsync before rename: otherwise a crash can leave a complete-looking
            # name pointing at unwritten blocks, which later runs would trust.
            os.fsync(f.fileno())
        if count != expected:
            raise ValueError(
                f"building {path.name}: got {count} tokens, expected {expected}; "
                "the input files changed while being read, run again"
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return h.hexdigest()


def _read_sidecar(
    meta_path: Path, bin_path: Path, expected: int, dtype: str, source: str
) -> CorpusInfo | None:
    try:
        meta = json.loads(meta_path.read_text())
        size = bin_path.stat().st_size
    except (OSError, ValueError):
        return None
    if (
        not isinstance(meta, dict)
        or meta.get("format") != _FORMAT
        or meta.get("num_tokens") != expected
        or meta.get("dtype") != dtype
        or size != expected * _np_dtype(dtype).itemsize
        or not isinstance(meta.get("sha256"), str)
    ):
        return None
    return CorpusInfo(bin_path, expected, meta["sha256"], dtype, source)


def _cached_token_file(
    cache_dir: Path,
    stem: str,
    *,
    expected: int,
    source: str,
    chunks: Callable[[], Iterator[np.ndarray]],
    dtype: str = "uint16",
) -> CorpusInfo:
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    bin_path = cache_dir / f"{stem}.bin"
    meta_path = cache_dir / f"{stem}.json"
    info = _read_sidecar(meta_path, bin_path, expected, dtype, source)
    if info is not None:
        return info
    try:
        have_bin = bin_path.stat().st_size == expected * _np_dtype(dtype).itemsize
    except OSError:
        have_bin = False
    if have_bin:
        # Another process has renamed the .bin into place but not yet written
        # the sidecar (or the sidecar was lost): the content is determined by
        # the key, so hashing it is enough and avoids rewriting it under readers.
        sha = _sha256_file(bin_path)
    else:
        sha = _write_tokens_atomic(bin_path, chunks(), dtype, expected)
    _write_json_atomic(
        meta_path,
        {
            "format": _FORMAT,
            "num_tokens": expected,
            "sha256": sha,
            "dtype": dtype,
            "source": source,
        },
    )
    return CorpusInfo(bin_path, expected, sha, dtype, source)


def _file_chunks(files: list[Path]) -> Iterator[np.ndarray]:
    for p in files:
        with open(p, "rb") as f:
            while data := f.read(_READ_CHUNK):
                yield np.frombuffer(data, dtype=np.uint8).astype(np.uint16)
        yield _EOS


# --------------------------------------------------------------------------- stdlib


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources() -> list[Path]:
    """The running interpreter's stdlib ``*.py`` files, minus tests/idlelib/site-packages.

    Sorted by relative posix path so the corpus layout does not depend on
    filesystem enumeration order.
    """
    root = _stdlib_root()
    found: list[tuple[str, Path]] = []
    # os.walk with pruning rather than rglob: site-packages can hold tens of
    # thousands of files, and walking them would make every cache hit slow.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_PARTS and d != "__pycache__"]
        base = Path(dirpath)
        for name in filenames:
            p = base / name
            if name.endswith(".py") and p.is_file():
                found.append((p.relative_to(root).as_posix(), p))
    found.sort()
    return [p for _, p in found]


def build_stdlib_corpus(cache_dir: Path) -> CorpusInfo:
    """Byte-tokenize the stdlib sources (each followed by EOS) into a cached uint16 file."""
    root = _stdlib_root()
    files = stdlib_sources()
    if not files:
        raise RuntimeError(
            f"no stdlib *.py sources found under {root}; this interpreter ships no sources"
        )
    fp = _fingerprint(files, root)
    key = _key({"format": _FORMAT, "kind": "stdlib", "files": fp})
    stem = f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-{key}"
    expected = sum(size for _, size, _ in fp) + len(fp)
    return _cached_token_file(
        Path(cache_dir),
        stem,
        expected=expected,
        source="stdlib",
        chunks=lambda: _file_chunks(files),
    )


# --------------------------------------------------------------------------- synthetic


def _synth_probs(vocab: int) -> np.ndarray:
    k = min(_SYNTH_FANOUT, _SYNTH_ALPHABET, vocab)
    p = np.array([2.0 ** -(i + 1) for i in range(k)])
    p[-1] += 1.0 - p.sum()
    return p


def synthetic_entropy_rate_nats(vocab: int = 256) -> float:
    """Per-token entropy of the synthetic chain: the loss floor a perfect model reaches."""
    p = _synth_probs(vocab)
    return float(-(p * np.log(p)).sum())


def _synthetic_tokens(num_tokens: int, seed: int, vocab: int) -> np.ndarray:
    # Everything derives from the PCG64 raw stream, which numpy guarantees to be
    # stable across versions and platforms (Generator methods are not).
    bitgen = np.random.default_rng(seed).bit_generator
    a = min(_SYNTH_ALPHABET, vocab)
    p = _synth_probs(vocab)
    k = len(p)
    alphabet = np.sort(np.argsort(bitgen.random_raw(vocab), kind="stable")[:a])
    # Each state (prev2, prev1) gets k distinct random successors; the i-th
    # successor has probability p[i], so the entropy rate is exactly H(p).
    succ = np.argsort(bitgen.random_raw(a * a * a).reshape(a * a, a), axis=1, kind="stable")[:, :k]
    states = np.arange(a * a)
    # Table indexed by state*k + choice, holding next_state*k so the hot loop
    # is one list lookup per token.
    table = (((states % a)[:, None] * a + succ) * k).reshape(-1).tolist()
    cdf = np.cumsum(p)
    cdf[-1] = 1.0
    u = (bitgen.random_raw(num_tokens) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    choices = np.searchsorted(cdf, u, side="right").tolist()
    state = int(bitgen.random_raw(1)[0] % np.uint64(a * a)) * k
    out = [0] * num_tokens
    for i, c in enumerate(choices):
        state = table[state + c]
        out[i] = state
    symbols = (np.asarray(out, dtype=np.int64) // k) % a
    return alphabet[symbols].astype(np.uint16)


def synthetic_corpus(
    cache_dir: Path, *, num_tokens: int, seed: int, vocab: int = 256
) -> CorpusInfo:
    """A seeded, learnable corpus needing no download (for tests that assert numbers).

    Tokens follow a random sparse order-2 Markov chain over a 16-symbol subset
    of ``[0, vocab)``: its entropy rate (:func:`synthetic_entropy_rate_nats`,
    ~1.21 nats) is well below its unigram entropy (~ln 16), so a model that
    learns anything shows it. Identical arguments give identical bytes on any
    machine. Generation is a Python loop (~0.15 s per million tokens), cached.
    """
    if num_tokens < 1:
        raise ValueError(f"synthetic_corpus: num_tokens must be >= 1, got {num_tokens}")
    if seed < 0:
        raise ValueError(f"synthetic_corpus: seed must be >= 0, got {seed}")
    if not 2 <= vocab <= 65536:
        raise ValueError(
            f"synthetic_corpus: vocab must be in [2, 65536] to fit uint16, got {vocab}"
        )
    key = _key(
        {
            "format": _FORMAT,
            "kind": "synthetic",
            "n": num_tokens,
            "seed": seed,
            "vocab": vocab,
        }
    )
    stem = f"synthetic-n{num_tokens}-s{seed}-v{vocab}-{key}"
    return _cached_token_file(
        Path(cache_dir),
        stem,
        expected=num_tokens,
        source="synthetic",
        chunks=lambda: iter([_synthetic_tokens(num_tokens, seed, vocab)]),
    )


# --------------------------------------------------------------------------- user


def _load_bin(path: Path, cache_dir: Path, dtype: str) -> CorpusInfo:
    st = path.stat()
    itemsize = _np_dtype(dtype).itemsize
    if st.st_size == 0:
        raise ValueError(f"corpus {path} is empty (0 bytes): point at a token file with data")
    if st.st_size % itemsize:
        raise ValueError(
            f"corpus {path} is {st.st_size} bytes, not a multiple of {itemsize} ({dtype}): "
            "pass the token_dtype it was written with (uint8, uint16 or uint32), "
            "or check that the file is not truncated"
        )
    num_tokens = st.st_size // itemsize
    # The user's .bin can be many GB: remember its hash by (path, size, mtime).
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _key(
        {
            "format": _FORMAT,
            "kind": "user-bin",
            "path": str(path.resolve()),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
        }
    )
    meta_path = cache_dir / f"userbin-{key}.json"
    sha = None
    try:
        meta = json.loads(meta_path.read_text())
        sha = meta.get("sha256") if isinstance(meta, dict) else None
    except (OSError, ValueError):
        pass
    if not isinstance(sha, str):
        sha = _sha256_file(path)
        _write_json_atomic(
            meta_path,
            {
                "format": _FORMAT,
                "path": str(path.resolve()),
                "sha256": sha,
                "num_tokens": num_tokens,
                "dtype": dtype,
            },
        )
    return CorpusInfo(path, num_tokens, sha, dtype, "user")


def _is_under(p: Path, parent: Path) -> bool:
    try:
        p.relative_to(parent)
        return True
    except ValueError:
        return False


def load_user_corpus(path: Path, cache_dir: Path, *, token_dtype: str | None = None) -> CorpusInfo:
    """Load a user corpus: a flat ``.bin`` token file, a text file, or a directory of text files.

    ``.bin`` files are used in place (``token_dtype`` in uint8/uint16/uint32,
    default uint16). Text is byte-tokenized (each file followed by EOS, files
    in sorted relative-path order) into a cached uint16 token file.
    """
    path = Path(path)
    if token_dtype is not None and token_dtype not in _DTYPES:
        raise ValueError(
            f"unknown token_dtype {token_dtype!r} for corpus {path}: "
            f"use one of {', '.join(_DTYPES)}"
        )
    if not path.exists():
        raise ValueError(
            f"corpus path {path} does not exist: pass an existing .bin token file, "
            "a text file, or a directory of text files"
        )
    if path.is_file() and path.suffix == ".bin":
        return _load_bin(path, Path(cache_dir), token_dtype or "uint16")
    if token_dtype not in (None, "uint16"):
        raise ValueError(
            f"token_dtype={token_dtype!r} only applies to .bin token files, but {path} is text "
            "(byte-tokenized to uint16): drop token_dtype or rename the file to .bin"
        )
    if path.is_dir():
        root = path
        cache_abs = Path(cache_dir).resolve()
        # Skip the cache itself if it lives inside the corpus, or every build
        # would change the inputs of the next one.
        found = [
            (p.relative_to(root).as_posix(), p)
            for p in root.rglob("*")
            if p.is_file() and not _is_under(p.resolve(), cache_abs)
        ]
        files = [p for _, p in sorted(found)]
        if not files:
            raise ValueError(
                f"corpus {path} is empty: the directory has no files; add text files "
                "or point at a .bin token file"
            )
    elif path.is_file():
        root, files = path.parent, [path]
    else:
        raise ValueError(
            f"corpus path {path} is neither a regular file nor a directory: "
            "pass a file or directory"
        )
    fp = _fingerprint(files, root)
    total = sum(size for _, size, _ in fp)
    if total == 0:
        raise ValueError(
            f"corpus {path} is empty: its {len(fp)} file(s) have 0 bytes; "
            "add text or point elsewhere"
        )
    key = _key(
        {
            "format": _FORMAT,
            "kind": "user-text",
            "root": str(path.resolve()),
            "files": fp,
        }
    )
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", path.name)[:40] or "corpus"
    return _cached_token_file(
        Path(cache_dir),
        f"user-{name}-{key}",
        expected=total + len(fp),
        source="user",
        chunks=lambda: _file_chunks(files),
    )


# --------------------------------------------------------------------------- access


def open_tokens(info: CorpusInfo) -> np.ndarray:
    """A read-only memmap of the token file (shared through the page cache)."""
    return np.memmap(info.path, dtype=_np_dtype(info.dtype), mode="r", shape=(info.num_tokens,))


def unigram_entropy_nats(tokens: np.ndarray) -> float:
    """Entropy (nats) of the token frequency distribution.

    The loss of the best context-free model: a trained LM must beat it.
    """
    flat = np.asarray(tokens).reshape(-1)
    if flat.size == 0:
        raise ValueError("unigram_entropy_nats: tokens is empty")
    if flat.dtype.kind not in "ui":
        raise TypeError(f"unigram_entropy_nats: expected integer tokens, got dtype {flat.dtype}")
    if flat.dtype.kind == "i" and int(flat.min()) < 0:
        _, counts = np.unique(flat, return_counts=True)
    else:
        # Chunked so a multi-GB memmap is not copied to int64 all at once.
        counts = np.zeros(int(flat.max()) + 1, dtype=np.int64)
        for i in range(0, flat.size, _READ_CHUNK):
            counts += np.bincount(flat[i : i + _READ_CHUNK].astype(np.intp), minlength=counts.size)
    p = counts[counts > 0].astype(np.float64) / flat.size
    # max() turns the -0.0 of a single-symbol stream into 0.0.
    return max(0.0, float(-(p * np.log(p)).sum()))
