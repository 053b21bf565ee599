"""Tests for phalanx.data: tokenizer, corpora, windows, and the global batch sampler."""

from __future__ import annotations

import hashlib
import math
import multiprocessing as mp
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from phalanx.data import (
    ByteTokenizer,
    CorpusInfo,
    GlobalBatchSampler,
    TokenWindows,
    build_stdlib_corpus,
    load_user_corpus,
    open_tokens,
    stdlib_sources,
    synthetic_corpus,
    synthetic_entropy_rate_nats,
    train_val_split,
    unigram_entropy_nats,
)

# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_specials() -> None:
    tok = ByteTokenizer()
    assert tok.vocab_size == 259
    assert (tok.BOS, tok.EOS, tok.PAD) == (256, 257, 258)
    text = "héllo, wörld: ∑ 日本語 🚀\n"
    ids = tok.encode(text)
    assert ids.dtype == np.uint16
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text

    framed = tok.encode(text, bos=True, eos=True)
    assert framed[0] == tok.BOS and framed[-1] == tok.EOS and len(framed) == len(ids) + 2
    assert tok.decode(framed) == text
    # Specials anywhere (e.g. padding in model output) are dropped.
    assert tok.decode([tok.PAD, 104, tok.EOS, 105, tok.BOS]) == "hi"
    assert tok.decode(torch.tensor([104, 105])) == "hi"
    assert tok.encode(b"\x00\xff").tolist() == [0, 255]
    assert tok.encode("").size == 0 and tok.decode([]) == ""
    # Invalid utf-8 decodes with replacement rather than raising.
    assert tok.decode([0xFF]) == "\ufffd"
    with pytest.raises(ValueError, match="outside the ByteTokenizer vocabulary"):
        tok.decode([259])


# --------------------------------------------------------------------------- stdlib


def test_stdlib_sources_filtered_and_sorted() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    srcs = stdlib_sources()
    rels = [p.relative_to(root).as_posix() for p in srcs]
    assert rels == sorted(rels)
    assert "json/__init__.py" in rels and "os.py" in rels
    banned = {"test", "tests", "idlelib", "site-packages", "dist-packages"}
    for p in srcs:
        assert p.suffix == ".py"
        assert not banned.intersection(p.relative_to(root).parts), p


def test_stdlib_corpus_build_and_cache_hit(tmp_path: Path) -> None:
    info = build_stdlib_corpus(tmp_path)
    assert info.source == "stdlib" and info.dtype == "uint16"
    assert info.path.parent == tmp_path and info.path.name.startswith("stdlib-py")
    srcs = stdlib_sources()
    assert info.num_tokens == sum(p.stat().st_size for p in srcs) + len(srcs)
    assert info.num_tokens > 1_000_000
    toks = open_tokens(info)
    assert not toks.flags.writeable
    assert int((toks == ByteTokenizer.EOS).sum()) == len(srcs)
    assert (
        toks[: srcs[0].stat().st_size].tobytes()
        == np.frombuffer(srcs[0].read_bytes(), np.uint8).astype("<u2").tobytes()
    )

    mtime = info.path.stat().st_mtime_ns
    sidecars = list(tmp_path.glob("*.json"))
    assert len(sidecars) == 1
    side_mtime = sidecars[0].stat().st_mtime_ns
    again = build_stdlib_corpus(tmp_path)
    assert again == info
    assert info.path.stat().st_mtime_ns == mtime
    assert sidecars[0].stat().st_mtime_ns == side_mtime

    # Losing the sidecar must not rewrite the .bin (other processes may be reading it).
    sidecars[0].unlink()
    rebuilt = build_stdlib_corpus(tmp_path)
    assert rebuilt == info and info.path.stat().st_mtime_ns == mtime


def _race_build(barrier: Any, cache_dir: Path, out: Any) -> None:
    # The barrier lines the builders up after their (slow) imports so the
    # builds themselves overlap, as when several workers start on one host.
    barrier.wait()
    out.put(build_stdlib_corpus(cache_dir))


def test_stdlib_corpus_concurrent_builds(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    out = ctx.Queue()
    procs = [ctx.Process(target=_race_build, args=(barrier, tmp_path, out)) for _ in range(3)]
    for p in procs:
        p.start()
    infos: list[CorpusInfo] = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len({i.sha256 for i in infos}) == 1
    assert len({i.path for i in infos}) == 1
    info = infos[0]
    assert hashlib.sha256(info.path.read_bytes()).hexdigest() == info.sha256
    assert info.path.stat().st_size == 2 * info.num_tokens
    # Only the final files remain: no temp files leaked by racing writers.
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".bin", ".json"]
    assert build_stdlib_corpus(tmp_path) == info


# ------------------------------------------------------------------- user corpora


def test_user_text_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "b.txt").write_text("bee")
    (data / "a.txt").write_text("ä")
    (data / "sub" / "c.md").write_text("c")
    cache = tmp_path / "cache"
    info = load_user_corpus(data, cache, token_dtype=None)
    assert info.source == "user" and info.dtype == "uint16"
    tok = ByteTokenizer()
    expected = np.concatenate(
        [
            tok.encode("ä", eos=True),
            tok.encode("bee", eos=True),
            tok.encode("c", eos=True),
        ]
    )
    assert open_tokens(info).tolist() == expected.tolist()
    mtime = info.path.stat().st_mtime_ns
    assert load_user_corpus(data, cache, token_dtype=None) == info
    assert info.path.stat().st_mtime_ns == mtime

    # Changing a file invalidates the cache key.
    (data / "b.txt").write_text("bees")
    changed = load_user_corpus(data, cache, token_dtype="uint16")
    assert changed.sha256 != info.sha256 and changed.num_tokens == info.num_tokens + 1

    single = load_user_corpus(data / "b.txt", cache, token_dtype=None)
    assert open_tokens(single).tolist() == tok.encode("bees", eos=True).tolist()


def test_user_text_dir_ignores_cache_inside_it(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("abc")
    first = load_user_corpus(tmp_path, tmp_path / ".cache", token_dtype=None)
    second = load_user_corpus(tmp_path, tmp_path / ".cache", token_dtype=None)
    assert first == second and first.num_tokens == 4


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32"])
def test_user_bin_round_trip(tmp_path: Path, dtype: str) -> None:
    hi = {"uint8": 255, "uint16": 65535, "uint32": 2**32 - 1}[dtype]
    arr = np.array([0, 1, 7, hi, 3], dtype=np.dtype(dtype).newbyteorder("<"))
    p = tmp_path / "toks.bin"
    arr.tofile(p)
    info = load_user_corpus(p, tmp_path / "cache", token_dtype=dtype)
    assert info.path == p and info.num_tokens == 5 and info.dtype == dtype
    assert open_tokens(info).tolist() == arr.tolist()
    assert info.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert load_user_corpus(p, tmp_path / "cache", token_dtype=dtype) == info


def test_user_bin_default_dtype_is_uint16(tmp_path: Path) -> None:
    p = tmp_path / "t.bin"
    np.array([1, 2, 300], dtype="<u2").tofile(p)
    info = load_user_corpus(p, tmp_path / "c", token_dtype=None)
    assert info.dtype == "uint16" and open_tokens(info).tolist() == [1, 2, 300]


def test_user_corpus_errors(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="does not exist") as e:
        load_user_corpus(missing, cache, token_dtype=None)
    assert str(missing) in str(e.value)

    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="is empty") as e:
        load_user_corpus(empty_dir, cache, token_dtype=None)
    assert str(empty_dir) in str(e.value)

    empty_txt = tmp_path / "empty.txt"
    empty_txt.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load_user_corpus(empty_txt, cache, token_dtype=None)

    empty_bin = tmp_path / "empty.bin"
    empty_bin.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load_user_corpus(empty_bin, cache, token_dtype=None)

    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00" * 6)
    with pytest.raises(ValueError, match=r"not a multiple of 4 \(uint32\).*token_dtype") as e:
        load_user_corpus(odd, cache, token_dtype="uint32")
    assert str(odd) in str(e.value)

    with pytest.raises(ValueError, match=r"unknown token_dtype 'int64'.*uint8, uint16, uint32"):
        load_user_corpus(odd, cache, token_dtype="int64")

    txt = tmp_path / "t.txt"
    txt.write_text("x")
    with pytest.raises(ValueError, match=r"only applies to \.bin"):
        load_user_corpus(txt, cache, token_dtype="uint32")


# --------------------------------------------------------------------------- synthetic


def test_synthetic_corpus_deterministic_and_learnable(tmp_path: Path) -> None:
    a = synthetic_corpus(tmp_path / "a", num_tokens=50_000, seed=1)
    b = synthetic_corpus(tmp_path / "b", num_tokens=50_000, seed=1)
    c = synthetic_corpus(tmp_path / "a", num_tokens=50_000, seed=2)
    assert a.sha256 == b.sha256 and a.source == "synthetic"
    assert a.path.read_bytes() == b.path.read_bytes()
    assert c.sha256 != a.sha256
    toks = open_tokens(a)
    assert int(toks.max()) < 256
    assert synthetic_corpus(tmp_path / "a", num_tokens=50_000, seed=1) == a

    # Empirical order-2 conditional entropy matches the stated floor, and is
    # well below unigram entropy: there is something to learn.
    x = np.asarray(toks, dtype=np.int64)
    ctx = x[:-2] * 256 + x[1:-1]
    _, joint = np.unique(ctx * 256 + x[2:], return_counts=True)
    _, marg = np.unique(ctx, return_counts=True)
    n = len(ctx)
    cond = -(joint / n * np.log(joint / n)).sum() + (marg / n * np.log(marg / n)).sum()
    floor = synthetic_entropy_rate_nats()
    assert abs(cond - floor) < 0.05
    assert unigram_entropy_nats(toks) > floor + 1.0

    small = synthetic_corpus(tmp_path, num_tokens=1000, seed=0, vocab=8)
    assert int(open_tokens(small).max()) < 8
    with pytest.raises(ValueError, match="num_tokens"):
        synthetic_corpus(tmp_path, num_tokens=0, seed=0)


def test_unigram_entropy_hand_made() -> None:
    # p = (1/2, 1/4, 1/4): H = 1.5 * ln 2.
    assert unigram_entropy_nats(np.array([5, 5, 9, 7], dtype=np.uint16)) == pytest.approx(
        1.5 * math.log(2)
    )
    assert unigram_entropy_nats(np.array([3, 3, 3])) == 0.0
    assert unigram_entropy_nats(np.arange(8)) == pytest.approx(math.log(8))
    assert unigram_entropy_nats(np.array([-1, 2])) == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="empty"):
        unigram_entropy_nats(np.array([], dtype=np.uint16))


# --------------------------------------------------------------------------- windows


def test_token_windows_shift_and_batch() -> None:
    toks = np.arange(100, dtype=np.uint16)
    ds = TokenWindows(toks, 8, start=10, stop=50)
    assert len(ds) == (40 - 1) // 8 == 4
    x, y = ds[0]
    assert x.dtype == torch.int64 and x.shape == (8,)
    assert x.tolist() == list(range(10, 18)) and y.tolist() == list(range(11, 19))
    x3, y3 = ds[3]
    assert y3.tolist()[-1] == 10 + 3 * 8 + 8 <= 49
    bx, by = ds.batch([3, 0])
    assert bx.shape == (2, 8) and by.shape == (2, 8)
    assert torch.equal(bx[0], x3) and torch.equal(by[1], y)
    assert torch.equal(bx[:, 1:], by[:, :-1])
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(IndexError):
        ds.batch([0, 4])
    with pytest.raises(ValueError, match="seq_len"):
        TokenWindows(toks, 0)
    with pytest.raises(ValueError, match="start"):
        TokenWindows(toks, 4, start=60, stop=50)
    assert len(TokenWindows(toks, 99)) == 1 and len(TokenWindows(toks, 100)) == 0


def test_train_val_split_disjoint() -> None:
    toks = np.arange(1000, dtype=np.uint16)
    (t0, t1), (v0, v1) = train_val_split(1000, 0.1, 16)
    assert (t0, t1, v0, v1) == (0, 900, 900, 1000)
    train = TokenWindows(toks, 16, start=t0, stop=t1)
    val = TokenWindows(toks, 16, start=v0, stop=v1)
    tx, ty = train.batch(range(len(train)))
    vx, vy = val.batch(range(len(val)))
    train_seen = set(torch.cat([tx, ty], 1).flatten().tolist())
    val_seen = set(torch.cat([vx, vy], 1).flatten().tolist())
    assert not train_seen & val_seen
    assert max(val_seen) < 1000 and min(val_seen) >= 900
    with pytest.raises(ValueError, match=r"validation range has 5 tokens.*seq_len=16 needs 17"):
        train_val_split(50, 0.1, 16)
    with pytest.raises(ValueError, match="train range"):
        train_val_split(40, 0.9, 16)
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(1000, 0.0, 16)


# --------------------------------------------------------------------------- sampler


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def _schedules(draw: st.DrawFn) -> tuple[int, int, int, list[tuple[int, int]]]:
    n = draw(st.integers(1, 60))
    b = draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**32))
    divs = _divisors(b)
    segs = draw(
        st.lists(st.tuples(st.integers(1, 12), st.sampled_from(divs)), min_size=1, max_size=5)
    )
    return n, b, seed, segs


@settings(max_examples=150, deadline=None)
@given(_schedules())
def test_sampler_exactly_once_under_resharding(
    sched: tuple[int, int, int, list[tuple[int, int]]],
) -> None:
    n, b, seed, segs = sched
    sampler = GlobalBatchSampler(n, b, seed)
    consumed: list[int] = []
    step = 0
    for nsteps, dp in segs:
        # A fresh object per segment: a restart (possibly at a new world size)
        # only knows (num_samples, global_batch, seed, step).
        sampler = GlobalBatchSampler(n, b, seed)
        for _ in range(nsteps):
            parts = [sampler.rank_indices(step, r, dp) for r in range(dp)]
            assert all(len(p) == b // dp for p in parts)
            flat = np.concatenate(parts)
            assert np.array_equal(flat, sampler.step_indices(step))
            # Ranks get disjoint positions; ids can only recur within a step
            # when the step straddles an epoch boundary (a new permutation).
            if (step * b) // n == ((step + 1) * b - 1) // n:
                assert len(set(flat.tolist())) == b
            mbs = sampler.micro_batches(step, dp - 1, dp, 1)
            assert np.array_equal(np.concatenate(mbs), parts[-1])
            assert sampler.epoch_of(step) == step * b // n
            consumed.extend(flat.tolist())
            step += 1
    # Each epoch-sized chunk of the consumed stream is a permutation, the tail
    # has no repeats: nothing skipped or duplicated across restarts/reshards.
    full, tail = divmod(len(consumed), n)
    for e in range(full):
        assert sorted(consumed[e * n : (e + 1) * n]) == list(range(n))
    rest = consumed[full * n :]
    assert len(set(rest)) == len(rest) == tail
    # Continuing in one object equals resuming from any step in a fresh one.
    cont = GlobalBatchSampler(n, b, seed)
    stream = [cont.step_indices(s) for s in range(step)]
    assert np.concatenate(stream).tolist() == consumed
    resume_at = step // 2
    fresh = GlobalBatchSampler(n, b, seed)
    for s in range(resume_at, step):
        assert np.array_equal(fresh.step_indices(s), stream[s])


def test_sampler_ranks_disjoint_and_errors() -> None:
    s = GlobalBatchSampler(1000, 64, seed=3)
    for step in (0, 5, 14, 16):  # 15 straddles the epoch boundary
        parts = [set(s.rank_indices(step, r, 8).tolist()) for r in range(8)]
        assert sum(len(p) for p in parts) == 64
        assert len(set().union(*parts)) == 64
    assert s.epoch_of(15) == 0 and s.epoch_of(16) == 1
    mbs = s.micro_batches(2, 1, 4, 4)
    assert len(mbs) == 4 and all(len(m) == 4 for m in mbs)
    assert not np.array_equal(s.permutation(0), s.permutation(1))
    assert not np.array_equal(GlobalBatchSampler(1000, 64, 4).step_indices(0), s.step_indices(0))
    with pytest.raises(ValueError, match="dp_size=3 must divide global_batch=64"):
        s.rank_indices(0, 0, 3)
    with pytest.raises(ValueError, match="micro_batch_size=3 must divide"):
        s.micro_batches(0, 0, 4, 3)
    with pytest.raises(ValueError, match="dp_rank"):
        s.rank_indices(0, 4, 4)
    with pytest.raises(ValueError, match="step"):
        s.step_indices(-1)


def test_sampler_batch_larger_than_dataset() -> None:
    s = GlobalBatchSampler(3, 7, seed=0)
    ids = np.concatenate([s.step_indices(k) for k in range(3)]).tolist()
    for e in range(7):
        assert sorted(ids[3 * e : 3 * e + 3]) == [0, 1, 2]


def test_sampler_is_stable_across_versions() -> None:
    # Pins the order so an accidental change to the derivation (which would
    # silently break resuming existing runs) fails loudly.
    s = GlobalBatchSampler(10, 4, seed=0)
    assert s.step_indices(0).tolist() == [3, 2, 1, 8]
    assert s.step_indices(3).tolist() == [5, 1, 9, 8]
