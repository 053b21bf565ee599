"""Low-communication training across slow links: DiLoCo, Streaming DiLoCo, NoLoCo.

Replicas (`dp_replicate`; each may itself be a pipeline x tensor-parallel model) train alone
with their inner optimizer and meet only at outer steps, over a process group of their own
(`link.Link`, which also counts every byte it sends). `base.py` states the trainer's
contract; each method is one short file. Recipe keys: `lowcomm.*` (phalanx/config.py).

Failures. The outer state is part of the trainer's state (lowcomm/... in
phalanx/checkpoint/state.py): survivors keep it, a replacement gets it from a live replica
with the rest of that replica's state, checkpoints hold it. A replacement (or a replica
the run grows by) then starts from the global model, not from its source's local one
(`OuterOptimizer.rejoin`). What the lost replica learned since its work last reached the
global model dies with it; the samples it consumed in that window are re-queued to the
next generation's replicas, keeping exactly-once (requeue.py says how, per method). An
exchange in flight when a generation ends is abandoned with the old groups (waits on it
give up with the generation, so an outer step never waits on a dead replica; Streaming
DiLoCo redoes that fragment's exchange, without overlap, at its sync step).
"""

from __future__ import annotations

from typing import Any

import torch

from phalanx.parallel.lowcomm.base import OuterOptimizer, local_view
from phalanx.parallel.lowcomm.diloco import DiLoCo
from phalanx.parallel.lowcomm.link import Link, replica_link
from phalanx.parallel.lowcomm.noloco import NoLoCo, gossip_groups
from phalanx.parallel.lowcomm.streaming import StreamingDiLoCo, fragment_of

__all__ = ["METHODS", "DiLoCo", "Link", "NoLoCo", "OuterOptimizer", "StreamingDiLoCo",
           "build_outer", "fragment_of", "gossip_groups", "local_view", "replica_link",
           "summarize"]

METHODS = ("none", "diloco", "streaming_diloco", "noloco")


def build_outer(cfg: Any, *, named_params: list[tuple[str, torch.Tensor]], link: Link,
                num_layers: int, seed: int) -> OuterOptimizer | None:
    """The outer optimizer `cfg` (a LowCommConfig) asks for, over this rank's parameters;
    None for lowcomm.method=none."""
    common = dict(link=link, sync_every=cfg.sync_every, quantize=cfg.quantize,
                  quant_block=cfg.quant_block, outer_lr=cfg.outer_lr,
                  outer_momentum=cfg.outer_momentum)
    if cfg.method == "none":
        return None
    if cfg.method == "diloco":
        return DiLoCo(named_params, nesterov=cfg.nesterov, **common)
    if cfg.method == "streaming_diloco":
        return StreamingDiLoCo(named_params, nesterov=cfg.nesterov, fragments=cfg.fragments,
                               num_layers=num_layers, overlap_steps=cfg.overlap_steps,
                               mixing=cfg.mixing, **common)
    if cfg.method == "noloco":
        return NoLoCo(named_params, group_size=cfg.group_size,
                      local_averaging=cfg.local_averaging, seed=seed, **common)
    raise ValueError(f"lowcomm.method={cfg.method!r}: choose one of {', '.join(METHODS)}")


def summarize(metrics: list[dict[str, Any]]) -> dict[str, Any] | None:
    """summary.json's `lowcomm` block from the committed steps' records (rank 0's counters:
    bytes a worker sent over the replica link, the most one sync sent, time blocked)."""
    ms = [m for m in metrics if "lowcomm_bytes" in m]
    if not ms:
        return None
    return {
        "bytes_sent_per_worker": sum(m["lowcomm_bytes"] for m in ms),
        "payload_bytes_per_worker": sum(m["lowcomm_payload_bytes"] for m in ms),
        "peak_bytes_per_sync": max(m["lowcomm_peak_bytes"] for m in ms),
        "blocked_s": sum(m["lowcomm_blocked_s"] for m in ms),
        "syncs": sum(m["lowcomm_syncs"] for m in ms),
    }
