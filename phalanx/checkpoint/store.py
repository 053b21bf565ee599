"""The on-disk checkpoint: a DCP checkpoint plus a manifest that makes it complete or invisible.

Layout of one checkpoint (DESIGN.md invariant 4):

    ROOT/step_000000120/
        __0_0.distcp, __1_0.distcp, ...   DCP data, one file per writing rank
        .metadata                         DCP's index (a pickle: verified before it is read)
        manifest.json                     written last: tmp, fsync, rename, fsync the directory

A checkpoint without a manifest, or whose files do not match the manifest's
sizes and SHA-256 sums, does not exist as far as `latest` and `load` are
concerned; they report it and fall back to the previous good one. The manifest
is signed (HMAC-SHA256) with the run's token when one is set; a manifest signed
with another token is accepted on its checksums alone, with a warning, because
a resumed run has a new token unless PHALANX_TOKEN is set for both.

Nothing here decides when to save or which checkpoint to recover from.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from phalanx.checkpoint.boxes import BoxLoadPlanner, BoxSavePlanner

log = logging.getLogger("phalanx.checkpoint")

FORMAT = "phalanx-checkpoint/1"
MANIFEST = "manifest.json"
_PREFIX = "step_"

__all__ = ["FORMAT", "MANIFEST", "CheckpointError", "latest", "list_checkpoints", "load",
           "prune", "read_tensors", "save", "step_dir", "verify"]


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded (missing manifest, bad checksum, torn write)."""


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"{_PREFIX}{step:09d}"


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns that it assumes one process whenever torch.distributed is off: that is
    the intent here (export, tests, single-process runs), so the warning is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _token_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def _sign(body: Mapping[str, Any], token: str) -> str:
    msg = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()


def _files_of(path: Path, pg_rank: int | None) -> dict[str, dict[str, Any]]:
    names = sorted(p.name for p in path.iterdir() if p.name.endswith(".distcp")
                   and (pg_rank is None or p.name.startswith(f"__{pg_rank}_")))
    return {n: {"bytes": (path / n).stat().st_size, "sha256": _sha256(path / n)} for n in names}


def save(state: Mapping[str, Any], path: str | Path, *, meta: Mapping[str, Any],
         token: str | None = None, process_group: dist.ProcessGroup | None = None) -> dict:
    """Write `state` (tensors, DTensors, `Boxes`) as a DCP checkpoint at `path`, then commit it
    with a manifest. Collective over `process_group` when torch.distributed is initialized
    (every rank calls it with its own pieces); returns the manifest."""
    path = Path(path)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(process_group) if distributed else 0
    if rank == 0:
        # Re-saving a step (after a rollback) first makes the old copy invisible.
        (path / MANIFEST).unlink(missing_ok=True)
        path.mkdir(parents=True, exist_ok=True)
    if distributed:
        dist.barrier(group=process_group)
    t0 = time.perf_counter()
    with _quiet():
        dcp.save(dict(state),
                 storage_writer=FileSystemWriter(path, sync_files=True, thread_count=1),
                 planner=BoxSavePlanner(), process_group=process_group, no_dist=not distributed)
    # Every rank hashes the file it wrote (in parallel); the coordinator writes the manifest.
    mine = _files_of(path, rank if distributed else None)
    files: dict[str, Any] = {}
    if distributed:
        gathered: list[Any] = [None] * dist.get_world_size(process_group)
        dist.all_gather_object(gathered, mine, group=process_group)
        for g in gathered:
            files.update(g)
    else:
        files = mine
    manifest: dict[str, Any] = {}
    if rank == 0:
        files[".metadata"] = {"bytes": (path / ".metadata").stat().st_size,
                              "sha256": _sha256(path / ".metadata")}
        manifest = {"format": FORMAT, **meta, "files": files, "created_unix": time.time(),
                    "write_s": time.perf_counter() - t0}
        if token:
            manifest["token_id"] = _token_id(token)
            manifest["signature"] = _sign(manifest, token)
        tmp = path / (MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path / MANIFEST)
        _fsync_dir(path)
        _fsync_dir(path.parent)
    if distributed:
        box = [manifest]
        dist.broadcast_object_list(box, src=dist.get_global_rank(process_group, 0)
                                   if process_group is not None else 0, group=process_group)
        manifest = box[0]
    return manifest


def verify(path: str | Path, *, token: str | None = None) -> dict[str, Any]:
    """The manifest of a complete, intact checkpoint; CheckpointError saying what is wrong."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (torn or still being written)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if "signature" in manifest:
        body = {k: v for k, v in manifest.items() if k != "signature"}
        if token and manifest.get("token_id") == _token_id(token):
            if not hmac.compare_digest(manifest["signature"], _sign(body, token)):
                raise CheckpointError(f"{path}: manifest signature does not match (tampered?)")
        else:
            log.warning("%s: manifest signed with another run's token; trusting checksums only "
                        "(set PHALANX_TOKEN to the same value for both runs to verify it)", path)
    files = manifest.get("files") or {}
    if ".metadata" not in files:
        raise CheckpointError(f"{path}: manifest lists no .metadata")
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{path}: {name} has {size} bytes, manifest says {want['bytes']}")
        if _sha256(f) != want["sha256"]:
            raise CheckpointError(f"{path}: {name} checksum mismatch (corrupted)")
    return manifest


def list_checkpoints(root: str | Path) -> list[Path]:
    """Step directories under root, newest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)
            and p.name[len(_PREFIX):].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len(_PREFIX):]), reverse=True)


def latest(root: str | Path, *, token: str | None = None
           ) -> tuple[Path | None, dict[str, Any] | None, list[tuple[str, str]]]:
    """(newest verified checkpoint, its manifest, [(skipped path, why)])."""
    skipped: list[tuple[str, str]] = []
    for p in list_checkpoints(root):
        try:
            return p, verify(p, token=token), skipped
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
            skipped.append((str(p), str(e)))
    return None, None, skipped


def load(state: Mapping[str, Any], path: str | Path, *, token: str | None = None,
         process_group: dist.ProcessGroup | None = None, verified: dict | None = None
         ) -> dict[str, Any]:
    """Fill `state`'s tensors / `Boxes` in place from the checkpoint at `path`, which is
    verified first (by rank 0 of the group, result broadcast) unless `verified` is its
    manifest already. Nothing is unpickled before its checksum has been checked."""
    distributed = dist.is_available() and dist.is_initialized()
    manifest = verified
    if manifest is None:
        rank = dist.get_rank(process_group) if distributed else 0
        result: list[Any] = [None]
        if rank == 0:
            try:
                result = [verify(path, token=token)]
            except CheckpointError as e:
                result = [str(e)]
        if distributed:
            dist.broadcast_object_list(result, src=dist.get_global_rank(process_group, 0)
                                       if process_group is not None else 0, group=process_group)
        if isinstance(result[0], str):
            raise CheckpointError(result[0])
        manifest = result[0]
    with _quiet():
        dcp.load(dict(state), storage_reader=FileSystemReader(str(path)),
                 planner=BoxLoadPlanner(), process_group=process_group, no_dist=not distributed)
    return manifest


def read_tensors(path: str | Path, *, prefix: str = "", token: str | None = None
                 ) -> dict[str, Any]:
    """Every tensor under `prefix` of a verified checkpoint, whole, in this process (no
    torch.distributed needed): export, tests, inspection."""
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    verify(path, token=token)
    md = FileSystemReader(str(path)).read_metadata()
    state = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
             for k, v in md.state_dict_metadata.items()
             if isinstance(v, TensorStorageMetadata) and k.startswith(prefix)}
    with _quiet():
        dcp.load(state, storage_reader=FileSystemReader(str(path)), planner=BoxLoadPlanner(),
                 no_dist=True)
    return state


def prune(root: str | Path, *, keep_last: int, keep_every: int = 0,
          token: str | None = None) -> list[Path]:
    """Delete all but the newest `keep_last` good checkpoints (and multiples of keep_every);
    torn ones older than the newest good one go too. Returns what was deleted."""
    good, gone = [], []
    for p in list_checkpoints(root):
        ok = (p / MANIFEST).is_file()
        step = int(p.name[len(_PREFIX):])
        if ok and len(good) < keep_last:
            good.append(p)
            continue
        if ok and keep_every and step % keep_every == 0:
            continue
        if not ok and not good:
            continue  # may be the write in flight right now
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p)
    return gone
