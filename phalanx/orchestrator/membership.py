"""Generations: every change of membership is a new generation with its own store prefix.

The controller publishes, under `g{G}/`: the recipe, the plan (members + layout), and the
`recovery` record that tells each worker where its state comes from:

    {"kind": "fresh", "step": 0}                                   first generation
    {"kind": "resume", "path": CKPT, "step": S}                    checkpoint.resume
    {"kind": "replica", "step": S, "sources": {lost: source}}      exact, no rollback
    {"kind": "peer", "step": S, "sources": {lost: holder}}         every rank rolls back to
                                                                   its snapshot in memory
    {"kind": "checkpoint", "path": CKPT, "step": S}                every rank rolls back
    {"kind": "restart", "step": 0}                                 nothing to recover from

then flips the run-global `current` key, which is what survivors wait for. Workers that
are members build their groups under `g{G}/pg`; the old groups are abandoned.

The choice of source (`choose_recovery`) is the recovery policy: the cheapest exact source
first -- a live data-parallel replica of every lost shard (no step is lost) -- else the
newest verified checkpoint (peer memory or disk: every rank rolls back to its step).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phalanx.orchestrator.commit import RUN
from phalanx.orchestrator.control_plane import ControlPlane

log = logging.getLogger("phalanx.controller")

__all__ = ["Recovery", "choose_recovery", "peer_recovery", "publish_generation"]


@dataclass
class Recovery:
    kind: str
    step: int
    sources: dict[int, int] | None = None
    path: str | None = None
    # lost rank -> the ranks it is rebuilt from: (previous, next) stage to average, or
    # (swap partner,) to copy (CheckFree+'s end stages).
    rebuild: dict[int, tuple[int, ...]] | None = None

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "step": self.step}
        if self.sources is not None:
            out["sources"] = {str(k): v for k, v in self.sources.items()}
        if self.path is not None:
            out["path"] = self.path
        if self.rebuild is not None:
            out["rebuild"] = {str(k): list(v) for k, v in self.rebuild.items()}
        return out


def choose_recovery(*, policy: str, layout: Any, lost: set[int], committed_steps: int,
                    checkpoint_root: Path, token: str | None,
                    checkfree_ok: bool = False,
                    peer_copies: dict[int, tuple[int, int]] | None = None
                    ) -> tuple[Recovery | None, str]:
    """(recovery, why). `committed_steps`: optimizer steps the survivors have committed.
    `peer_copies`: holder rank -> (ward rank, step) of the newest buddy copy each holds.
    `checkfree_ok`: the trainer keeps whole stages per rank (no TP, no ZeRO), so CheckFree
    can rebuild one from its neighbours (fault.policy=checkfree)."""
    from phalanx.checkpoint.recover import checkfree_sources, replica_source
    from phalanx.checkpoint.store import latest

    alive = set(range(layout.world_size)) - lost
    checkfree = policy in ("checkfree", "checkfree_plus")
    if policy in ("auto", "replica") or checkfree:
        sources = {r: replica_source(layout, r, alive) for r in sorted(lost)}
        if all(s is not None for s in sources.values()):
            return Recovery("replica", committed_steps, sources=sources), \
                "a data-parallel replica of every lost shard is alive"
    if checkfree and checkfree_ok:
        # Exact where a replica lives; CheckFree(+) for stages with no copy anywhere. A stage
        # rebuilt from neighbours that are themselves lost cannot be: fall back below.
        plus = policy == "checkfree_plus"
        exact = {r: s for r, s in sources.items() if s is not None}
        rebuild = {r: checkfree_sources(layout, r, alive, plus=plus)
                   for r in sorted(lost) if r not in exact}
        if all(v is not None for v in rebuild.values()) and not (set(rebuild) & {
                s for v in rebuild.values() for s in v}):
            name = "CheckFree+" if plus else "CheckFree"
            return Recovery("checkfree", committed_steps, sources=exact, rebuild=rebuild), \
                (f"stage(s) of rank(s) {sorted(rebuild)} have no copy: rebuilt from their "
                 f"neighbour stages ({name})")
    if policy == "replica":
        return None, (f"fault.policy=replica but rank(s) {sorted(lost)} have no live replica "
                      f"(parallel.dp_replicate={layout.dp_replicate})")
    if policy in ("auto", "checkpoint") or checkfree:
        path, manifest, skipped = latest(checkpoint_root, token=token)
        for bad, why in skipped:
            log.warning("recovery skips checkpoint %s: %s", bad, why)
        peer = peer_recovery(peer_copies or {}, lost=lost, alive=alive)
        if peer is not None and (path is None or peer.step >= int(manifest["step"])):
            return peer, (f"no live replica; the lost rank(s)' snapshots of step {peer.step} "
                          f"are in their buddies' memory (ranks "
                          f"{sorted(set(peer.sources.values()))})")
        if path is not None:
            return Recovery("checkpoint", int(manifest["step"]), path=str(path)), \
                f"no live replica; newest verified checkpoint is step {manifest['step']}"
        return Recovery("restart", 0), "no live replica and no checkpoint: restarting from step 0"
    return None, f"fault.policy={policy}"


def peer_recovery(peer_copies: dict[int, tuple[int, int]], *, lost: set[int],
                  alive: set[int]) -> Recovery | None:
    """Everyone back to step S from memory: each lost rank's snapshot of S from the buddy
    that holds it, every survivor's own from its host memory. Only when every survivor's
    newest peer exchange is S (the exchange is collective: its own snapshot of S is then
    pinned in memory) and every lost rank's copy of S lives on a survivor."""
    steps = {peer_copies[r][1] for r in alive if r in peer_copies}
    if len(steps) != 1 or not alive <= set(peer_copies):
        return None
    (step,) = steps
    sources = {}
    for lr in sorted(lost):
        holder = next((h for h in sorted(alive) if peer_copies[h] == (lr, step)), None)
        if holder is None:
            return None
        sources[lr] = holder
    return Recovery("peer", step, sources=sources)


def publish_generation(store: Any, *, token: str, generation: int, config: dict[str, Any],
                       plan_json: str, recovery: dict[str, Any]) -> ControlPlane:
    """Write generation G's keys, then make it current (the order matters: a survivor that
    sees `current` must find the plan and the recovery record already there)."""
    cp = ControlPlane(store, token=token, generation=generation)
    cp.set("config", config)
    cp.set("plan", plan_json)
    cp.set("recovery", recovery)
    ControlPlane(store, token=token, generation=RUN).set("current", {"generation": generation})
    return cp
