"""Save a trainer's state and load it back, onto the same layout or another one.

The checkpoint names every tensor by the model's own parameter names and global
shapes (`state.py`), so a load onto another dp / pp / tp / ZeRO split asks DCP
for exactly the boxes the new rank holds and DCP reads their overlaps from
whatever files the old ranks wrote. The sampler is a pure function of the step
(`phalanx.data.sampler`): restoring `trainer/step` re-shards the rest of the
epoch over the new dp size with nothing skipped or repeated (invariant 3).
The global batch is part of the recipe, not the layout, so the gradient scale
is unchanged (invariant 5); a checkpoint whose model or global batch differs is
refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist

from phalanx.checkpoint import store
from phalanx.checkpoint.state import restore_after_load, trainer_state

log = logging.getLogger("phalanx.checkpoint")

__all__ = ["checkpoint_meta", "default_root", "load_trainer", "recipe_hash", "resolve", "save_trainer"]


def recipe_hash(run: Any) -> str:
    """What must match for a checkpoint to continue this run: model and batch/sequence shape
    (not the layout, the fault or checkpoint settings, or logging)."""
    d = run.to_dict()
    keep = {"model": d["model"], "global_batch": d["trainer"]["global_batch"],
            "seq_len": d["trainer"]["seq_len"]}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_meta(trainer: Any, step: int) -> dict[str, Any]:
    return {"step": step, "layout": trainer.layout.to_dict(),
            "world": dist.get_world_size() if dist.is_initialized() else 1,
            "recipe_hash": recipe_hash(trainer.run), "model": trainer.run.to_dict()["model"],
            "global_batch": trainer.run.trainer.global_batch}


def save_trainer(trainer: Any, root: str | Path, *, step: int, token: str | None = None) -> dict:
    """Synchronous save of the state after `step` optimizer steps (collective)."""
    return store.save(trainer_state(trainer, step=step), store.step_dir(root, step),
                      meta=checkpoint_meta(trainer, step), token=token)


def default_root(run: Any, run_dir: str | Path) -> Path:
    return Path(run.checkpoint.dir) if run.checkpoint.dir else Path(run_dir) / "checkpoints"


def resolve(spec: str, root: str | Path, *, token: str | None = None
            ) -> tuple[Path, dict[str, Any], list[tuple[str, str]]]:
    """`spec`: "latest" (newest verified checkpoint under root), a checkpoint directory, or a
    directory of checkpoints / a run directory (its newest verified checkpoint)."""
    if spec != "latest":
        p = Path(spec)
        if not p.is_dir():
            raise store.CheckpointError(f"{p} is not a directory")
        if (p / "checkpoints").is_dir():
            root, spec = p / "checkpoints", "latest"
        elif not (p / store.MANIFEST).exists() and store.list_checkpoints(p):
            root, spec = p, "latest"
    if spec == "latest":
        path, manifest, skipped = store.latest(root, token=token)
        if path is None:
            raise store.CheckpointError(f"no complete checkpoint under {root}"
                                        + (f" ({len(skipped)} skipped: {skipped[0][1]})"
                                           if skipped else ""))
        return path, manifest, skipped
    return Path(spec), store.verify(spec, token=token), []


def load_trainer(trainer: Any, path: str | Path, *, token: str | None = None,
                 manifest: dict[str, Any] | None = None) -> int:
    """Fill the trainer from the checkpoint at `path` (collective); returns the step to run
    next. RNG states come back only on the layout that saved them."""
    if manifest is None:
        # Rank 0 verifies and broadcasts, so every rank agrees before anything is read.
        box: list[Any] = [None]
        if not dist.is_initialized() or dist.get_rank() == 0:
            try:
                box = [store.verify(path, token=token)]
            except store.CheckpointError as e:
                box = [str(e)]
        if dist.is_initialized():
            dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], str):
            raise store.CheckpointError(box[0])
        manifest = box[0]
    if manifest.get("recipe_hash") != recipe_hash(trainer.run):
        raise store.CheckpointError(
            f"{path}: saved for another model or batch shape (model {manifest.get('model')}, "
            f"global_batch {manifest.get('global_batch')}); it cannot continue this recipe")
    world = dist.get_world_size() if dist.is_initialized() else 1
    same = manifest.get("layout") == trainer.layout.to_dict() and manifest.get("world") == world
    state = trainer_state(trainer, step=0, with_rng=same)
    store.load(state, path, verified=manifest)
    step = restore_after_load(trainer, state)
    if not same:
        log.info("resharded checkpoint %s from %s to %s", path, manifest.get("layout"),
                 trainer.layout.to_dict())
    return step
