"""The slow link between replicas: the exchanges outer optimizers make over it, each counted.

A `Link` is one process group of replicas of the same model piece (the ranks that share every
layout coordinate but `dp_replicate`), created for the outer optimizer alone so that an
exchange still in flight (Streaming DiLoCo's overlap) never interleaves with the trainer's
own collectives on another group. It offers three exchanges:

- `mean(flat)`: the replicas' average of a flat fp32 tensor. Unquantized it is one gloo/NCCL
  all-reduce. Quantized (int8/fp8/fp4, `phalanx.kernels.quant`) it is the two halves of a
  ring all-reduce done by hand so that sums stay fp32: each rank cuts its tensor into one
  chunk per rank, quantizes the chunks and sends chunk j to rank j (all-to-all); rank j
  dequantizes what it got, sums in fp32, averages, quantizes its reduced chunk once and
  everyone gathers those (all-gather). Every rank decodes the same bytes, so all hold the
  bit-identical average.
- `group_mean(flat, members)`: the average over a few replicas, by point-to-point sends
  (NoLoCo's gossip; no collective involves the others).

Accounting. For every exchange the link adds up, per worker: `payload_bytes`, the sizes of
the tensors it hands to the transport, and `bytes_sent`, what the transport's algorithm puts
on the wire for them from this worker -- gloo's ring all-reduce sends 2(M-1)/M of the
buffer, an all-to-all (M-1)/M of it, an all-gather (M-1) times the rank's part, a send its
size (measured with /proc/self/io on a 2- and a 4-rank world: the same to within gloo's
headers). `blocked_s` is the time the training thread spent waiting for an exchange;
`peak_sync_bytes` the most one exchange sent. The step's small agreement all-reduce (loss,
finiteness, stop: 24 bytes, which every method including plain DDP pays) is not counted.
NoLoCo's routed micro-batches (routing.py) add each step the activations and gradients a
pipeline rank sent to another replica (`count_p2p`: bytes, not syncs); the time a rank waits
for them is the pipeline's, not `blocked_s`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from phalanx.kernels.quant import Quantized, dequantize, payload_bytes, quantize
from phalanx.parallel import waits

__all__ = ["Link", "LinkStats", "Pending", "axis_group", "replica_link"]


@dataclass
class LinkStats:
    bytes_sent: int = 0
    payload_bytes: int = 0
    blocked_s: float = 0.0
    syncs: int = 0
    peak_sync_bytes: int = 0

    def add(self, *, sent: int, payload: int) -> None:
        self.bytes_sent += sent
        self.payload_bytes += payload
        self.syncs += 1
        self.peak_sync_bytes = max(self.peak_sync_bytes, sent)


class Pending:
    """An exchange in flight; `wait()` returns its result (and counts the time blocked)."""

    def __init__(self, link: Link, finish: Any) -> None:
        self.link, self._finish = link, finish

    def wait(self) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self._finish()
        finally:
            self.link.note_blocked(time.perf_counter() - t0)


class _Thread:
    """A blocking exchange run on a helper thread, waitable like a c10d Work (so `waits.wait`
    can abandon it when the generation ends)."""

    def __init__(self, fn: Any) -> None:
        self.result: torch.Tensor | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                self.error = e

        self.thread = threading.Thread(target=run, daemon=True, name="phalanx-lowcomm")
        self.thread.start()

    def wait(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


def _all_gather(out: torch.Tensor, mine: torch.Tensor, group: Any) -> Any:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, mine, group=group, async_op=True)


class Link:
    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.total = LinkStats()
        self.step = LinkStats()

    # -- accounting --------------------------------------------------------------------
    def _count(self, *, sent: int, payload: int) -> None:
        self.total.add(sent=sent, payload=payload)
        self.step.add(sent=sent, payload=payload)

    def count_p2p(self, nbytes: int) -> None:
        """Bytes sent point to point to other replicas outside any exchange (NoLoCo's routed
        micro-batches: activations and their gradients); counted as sent, not as a sync."""
        for s in (self.total, self.step):
            s.bytes_sent += nbytes
            s.payload_bytes += nbytes

    def note_blocked(self, seconds: float) -> None:
        self.total.blocked_s += seconds
        self.step.blocked_s += seconds

    def take_step(self) -> dict[str, Any]:
        """This step's figures (and the run's so far), then start counting the next step."""
        s = self.step
        self.step = LinkStats()
        return {"lowcomm_bytes": s.bytes_sent, "lowcomm_payload_bytes": s.payload_bytes,
                "lowcomm_blocked_s": s.blocked_s, "lowcomm_syncs": s.syncs,
                "lowcomm_peak_bytes": s.peak_sync_bytes,
                "lowcomm_bytes_total": self.total.bytes_sent}

    def totals(self) -> dict[str, Any]:
        return asdict(self.total)

    # -- exchanges ---------------------------------------------------------------------
    def ring_bytes(self, nbytes: int) -> int:
        """What a ring all-reduce of `nbytes` sends from each of M ranks: 2(M-1)/M of it."""
        return round(2 * (self.size - 1) * nbytes / self.size)

    def mean(self, flat: torch.Tensor, *, fmt: str = "none", block: int = 128) -> Pending:
        """Start averaging `flat` (1-D fp32) over the replicas; `wait()` gives the average
        (unquantized: `flat` itself, averaged in place)."""
        m = self.size
        if m == 1:
            return Pending(self, lambda: flat)
        if fmt == "none":
            self._count(sent=self.ring_bytes(flat.numel() * flat.element_size()),
                        payload=flat.numel() * flat.element_size())
            work = dist.all_reduce(flat, group=self.group, async_op=True)

            def finish() -> torch.Tensor:
                waits.wait(work)
                return flat.div_(m)

            return Pending(self, finish)
        chunk = -(-flat.numel() // (m * block)) * block  # values per rank's chunk, whole blocks
        cb = payload_bytes(chunk, fmt=fmt, block=block)
        # all-to-all: (M-1)/M of M chunks; all-gather: (M-1) chunks.
        self._count(sent=2 * (m - 1) * cb, payload=m * cb + cb)
        job = _Thread(lambda: self._quantized_mean(flat, fmt=fmt, block=block, chunk=chunk,
                                                   cb=cb))

        def finish_q() -> torch.Tensor:
            waits.wait(job)
            assert job.result is not None
            return job.result

        return Pending(self, finish_q)

    def _quantized_mean(self, flat: torch.Tensor, *, fmt: str, block: int, chunk: int,
                        cb: int) -> torch.Tensor:
        m, n = self.size, flat.numel()
        padded = flat.new_zeros(m * chunk)
        padded[:n] = flat
        send = torch.cat([quantize(padded[j * chunk:(j + 1) * chunk], fmt=fmt, block=block).payload
                          for j in range(m)])
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group, async_op=True).wait()
        acc = torch.zeros(chunk, dtype=torch.float32)
        for j in range(m):  # fp32 accumulation of the replicas' decoded chunks
            acc += dequantize(Quantized(fmt, block, chunk, recv[j * cb:(j + 1) * cb]))
        mine = quantize(acc.div_(m), fmt=fmt, block=block).payload
        gathered = torch.empty(m * cb, dtype=torch.uint8)
        _all_gather(gathered, mine, self.group).wait()
        out = torch.cat([dequantize(Quantized(fmt, block, chunk, gathered[j * cb:(j + 1) * cb]))
                         for j in range(m)])
        return out[:n].to(flat.device)

    def group_mean(self, flat: torch.Tensor, members: list[int], *, fmt: str = "none",
                   block: int = 128) -> torch.Tensor:
        """The average of `flat` over `members` (ranks of this link's group, this rank among
        them), exchanged point to point with each other member; blocking."""
        peers = [r for r in members if r != self.rank]
        if not peers:
            return flat.clone()
        t0 = time.perf_counter()
        if fmt == "none":
            out, bufs = flat, [torch.empty_like(flat) for _ in peers]
        else:
            out = quantize(flat, fmt=fmt, block=block).payload
            bufs = [torch.empty_like(out) for _ in peers]
        nbytes = out.numel() * out.element_size()
        self._count(sent=nbytes * len(peers), payload=nbytes * len(peers))
        works = []
        for r, buf in zip(peers, bufs, strict=True):
            g = self.global_rank(r)
            works.append(dist.isend(out, dst=g, group=self.group))
            works.append(dist.irecv(buf, src=g, group=self.group))
        for w in works:
            waits.wait(w)
        got = dict(zip(peers, bufs, strict=True))
        # Summed in member order on every member, so the group's members agree bit for bit.
        acc = torch.zeros_like(flat)
        for r in sorted(members):
            if r == self.rank:  # as the others decode it, when quantized
                acc += flat if fmt == "none" else dequantize(Quantized(fmt, block, flat.numel(), out))
            elif fmt == "none":
                acc += got[r]
            else:
                acc += dequantize(Quantized(fmt, block, flat.numel(), got[r]))
        self.note_blocked(time.perf_counter() - t0)
        return acc.div_(len(members))

    def global_rank(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)


def replica_link(layout: Any, rank: int) -> Link:
    """A fresh group per set of replicas (ranks equal in every coordinate but dp_replicate).
    Collective, as `axis_group`."""
    return Link(axis_group(layout, rank, ("dp_replicate",)))


def axis_group(layout: Any, rank: int, axes: tuple[str, ...]) -> dist.ProcessGroup:
    """This rank's group among fresh ones made for every set of ranks equal in every layout
    coordinate but `axes`. Collective: every rank of the world calls it, in the same order,
    and creates every such group (torch's new_group contract); each keeps its own."""
    seen: list[tuple[int, ...]] = []
    for r in range(layout.world_size):
        ranks = tuple(layout.group_ranks(r, axes))
        if ranks not in seen:
            seen.append(ranks)
    mine = None
    for ranks in seen:
        g = dist.new_group(list(ranks))
        if rank in ranks:
            mine = g
    assert mine is not None
    return mine
