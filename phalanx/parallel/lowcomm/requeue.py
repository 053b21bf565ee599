"""Exactly-once for low-communication training: a lost replica's unsynced samples go back in.

Between outer steps a replica's learning lives in its local model only. When the replica is
lost (replaced from a live replica, or left out when the run shrinks) that model dies with
it, and with it the samples it consumed since its work last reached the global model -- its
*window*. The default (the only behaviour today) re-queues them: the controller lists the
window's sample ids in the new generation's recovery record, and every replica of that
generation (survivors and newcomers alike) takes one extra micro-batch of the list per step,
dealt round-robin, until it is drained. A newcomer starts from the global model (not from
its source replica's local one, whose drift would otherwise count twice), so the samples'
effect is learned once more, by someone, exactly once.

Windows, per method (`window_start`):
- DiLoCo, NoLoCo: the steps since the last outer step (a multiple of H).
- Streaming DiLoCo: fragments sync at different steps; the window is that of the fragment
  synced longest ago, back to its pseudo-gradient snapshot (up to H + tau steps), so every
  lost contribution is re-learned; fragments synced later within the window see up to
  H - H/P of those steps' samples twice. (No per-fragment replay exists: a sample's gradient
  touches every fragment.)

Entries are explicit id lists ({start, ids, mbs, replicas}): a window's samples include the
extras the lost replica had been dealt from earlier entries, so a replica lost while
re-learning someone else's samples passes them on again. At each new generation the
controller rebases the list to the step the generation resumes at (what was dealt before it
is done; dealing restarts there over the new number of replicas); a rollback to an older
state (checkpoint, peer copy) restarts from the list as it was at that step.

The samples are dealt only where a step can take extra micro-batches: the data-parallel
trainer (pp = tp = 1). Under the pipeline runtime the number of micro-batches is fixed by
the schedule, so a lost replica's window is dropped (at most once) and an event says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["Ledger", "extra_micro_batches", "lost_samples", "rebase", "window_start"]


def window_start(lowcomm: Any, step: int) -> int:
    """First step of the work a replica lost after `step` steps had not handed to the
    global model yet (the window is [window_start, step))."""
    big = lowcomm.sync_every
    if lowcomm.method == "streaming_diloco":
        every, tau = big // lowcomm.fragments, lowcomm.overlap_steps
    else:
        every, tau = big, 0
    next_sync = (step // every + 1) * every  # the next fragment (or model) sync, > step
    return max(0, next_sync - big - tau)


def extra_micro_batches(entries: list[dict[str, Any]], step: int,
                        dp_rank: int) -> list[np.ndarray]:
    """The re-queued micro-batches replica `dp_rank` trains at `step` (one per live entry)."""
    out = []
    for e in entries:
        if step < e["start"]:
            continue
        j = (step - e["start"]) * e["replicas"] + dp_rank
        m = e["mbs"]
        ids = e["ids"][j * m:(j + 1) * m]
        if ids:
            out.append(np.asarray(ids, dtype=np.int64))
    return out


def lost_samples(sampler: Any, entries: list[dict[str, Any]], *, dp_rank: int, dp_size: int,
                 lo: int, hi: int) -> list[int]:
    """Every sample replica `dp_rank` of `dp_size` trained in steps [lo, hi): its share of
    each global batch and the re-queued micro-batches it was dealt."""
    ids: list[int] = []
    for s in range(lo, hi):
        ids += sampler.rank_indices(s, dp_rank, dp_size).tolist()
        ids += [int(i) for mb in extra_micro_batches(entries, s, dp_rank) for i in mb]
    return ids


def rebase(entries: list[dict[str, Any]], *, resume: int, replicas: int) -> list[dict[str, Any]]:
    """The entries as a generation resuming at step `resume` with `replicas` replicas deals
    them: what was dealt before `resume` dropped, dealing restarted at `resume`."""
    out = []
    for e in entries:
        if e["start"] > resume:
            continue
        done = (resume - e["start"]) * e["replicas"] * e["mbs"]
        rest = e["ids"][done:]
        if rest:
            out.append({**e, "start": resume, "ids": rest, "replicas": replicas})
    return out


class Ledger:
    """The controller's record of what each generation deals, and the source of the next
    generation's entries. `history` holds, per generation in the order they started: the
    step it resumed at, its entries, its number of replicas, and for each replica its
    index in the generation before (None: it started there, from the global model or a
    rolled-back state, so its window cannot reach further back)."""

    def __init__(self, lowcomm: Any, *, sampler: Any, replicas: int, micro_batch_size: int,
                 deals: bool, start: int = 0) -> None:
        self.lowcomm, self.sampler, self.mbs, self.deals = lowcomm, sampler, micro_batch_size, deals
        self.history: list[dict[str, Any]] = [
            {"start": start, "entries": [], "replicas": replicas, "back": {}}]

    def _lost(self, replica: int, step: int) -> tuple[int, list[int]]:
        """(first step, sample ids) of replica `replica`'s window, lost after `step` steps."""
        lo = window_start(self.lowcomm, step)
        ids: list[int] = []
        hi, d = step, replica
        for gen in reversed(self.history):
            a = max(lo, gen["start"])
            if a < hi:
                ids = lost_samples(self.sampler, gen["entries"], dp_rank=d,
                                   dp_size=gen["replicas"], lo=a, hi=hi) + ids
            if lo >= gen["start"] or d not in gen["back"] or gen["back"][d] is None:
                return max(lo, gen["start"]), ids
            hi, d = gen["start"], gen["back"][d]
        return lo, ids

    def continue_with(self, *, step: int, lost: list[int], back: dict[int, int | None],
                      replicas: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """A generation that goes on from `step` with live replicas (a replica recovery, a
        shrink or a grow): `lost` replicas' windows re-queued. `back` maps each replica of
        the new generation to its index before (None for a newcomer). Returns (entries for
        the new generation, one record per lost window for the event log)."""
        cur = self.history[-1]
        windows = []
        for d in sorted(lost):
            lo, ids = self._lost(d, step)
            windows.append({"replica": d, "steps": [lo, step], "samples": len(ids),
                            "requeued": self.deals, "ids": ids})
        entries = rebase(cur["entries"], resume=step, replicas=replicas)
        if self.deals:
            entries += [{"start": step, "ids": w["ids"], "mbs": self.mbs, "replicas": replicas}
                        for w in windows if w["ids"]]
        self.history.append({"start": step, "entries": entries, "replicas": replicas,
                             "back": back})
        return entries, windows

    def roll_back(self, *, step: int, replicas: int) -> list[dict[str, Any]]:
        """A generation that restarts from a saved state of step `step`: the entries as
        they were dealt at that step (from the newest generation that had begun by then)."""
        base = next(g for g in reversed(self.history) if g["start"] <= step)
        entries = rebase(base["entries"], resume=step, replicas=replicas)
        self.history.append({"start": step, "entries": entries, "replicas": replicas,
                             "back": dict.fromkeys(range(replicas))})
        return entries
