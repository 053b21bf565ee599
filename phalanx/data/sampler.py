"""Stateless global batch order: exactly-once, resumable and re-shardable."""

from __future__ import annotations

import numpy as np

__all__ = ["GlobalBatchSampler"]


class GlobalBatchSampler:
    """Maps training steps to sample ids as a pure function of ``(seed, step)``.

    Position ``p`` of an infinite stream is sample ``perm_e[p % num_samples]``
    of epoch ``e = p // num_samples``, where ``perm_e`` is a permutation seeded
    by ``(seed, e)``. Step ``s`` consumes positions ``[s*B, (s+1)*B)`` and dp
    rank ``r`` of ``n`` takes the contiguous ``r``-th ``B/n`` slice of them.

    Because nothing depends on history, a restarted job asks for step ``s``
    and gets what it would have got, and a job restarted with a different dp
    size still consumes every sample exactly once per epoch: the global order
    is fixed and only its split across ranks changes.
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError(f"GlobalBatchSampler: num_samples must be >= 1, got {num_samples}")
        if global_batch < 1:
            raise ValueError(f"GlobalBatchSampler: global_batch must be >= 1, got {global_batch}")
        if seed < 0:
            raise ValueError(f"GlobalBatchSampler: seed must be >= 0, got {seed}")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.seed = seed
        # A step straddling an epoch boundary needs two permutations; keeping
        # two avoids regenerating either on the following steps.
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch`` (read-only)."""
        perm = self._perms.get(epoch)
        if perm is None:
            # argsort of the raw PCG64 stream rather than Generator.permutation:
            # numpy guarantees the bit stream, not Generator algorithms, to be
            # stable across versions, and the order must survive upgrades.
            raw = np.random.default_rng([self.seed, epoch]).bit_generator.random_raw(
                self.num_samples
            )
            perm = np.argsort(raw, kind="stable")
            perm.flags.writeable = False
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def _positions(self, lo: int, hi: int) -> np.ndarray:
        out = np.empty(hi - lo, dtype=np.int64)
        n = self.num_samples
        p = lo
        while p < hi:
            e, off = divmod(p, n)
            take = min(hi - p, n - off)
            out[p - lo : p - lo + take] = self.permutation(e)[off : off + take]
            p += take
        return out

    def _check_step(self, step: int) -> int:
        step = int(step)
        if step < 0:
            raise ValueError(f"GlobalBatchSampler: step must be >= 0, got {step}")
        return step

    def step_indices(self, step: int) -> np.ndarray:
        """The ``global_batch`` sample ids of ``step``, in global order."""
        s = self._check_step(step)
        return self._positions(s * self.global_batch, (s + 1) * self.global_batch)

    def rank_indices(self, step: int, dp_rank: int, dp_size: int) -> np.ndarray:
        """The contiguous ``global_batch // dp_size`` slice of ``step`` owned by ``dp_rank``."""
        s = self._check_step(step)
        if dp_size < 1 or self.global_batch % dp_size:
            raise ValueError(
                f"GlobalBatchSampler: dp_size={dp_size} must divide "
                f"global_batch={self.global_batch}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(
                f"GlobalBatchSampler: dp_rank={dp_rank} out of range for dp_size={dp_size}"
            )
        per = self.global_batch // dp_size
        lo = s * self.global_batch + dp_rank * per
        return self._positions(lo, lo + per)

    def micro_batches(
        self, step: int, dp_rank: int, dp_size: int, micro_batch_size: int
    ) -> list[np.ndarray]:
        """``rank_indices`` split into gradient-accumulation micro-batches."""
        ids = self.rank_indices(step, dp_rank, dp_size)
        if micro_batch_size < 1 or len(ids) % micro_batch_size:
            raise ValueError(
                f"GlobalBatchSampler: micro_batch_size={micro_batch_size} must divide "
                "the per-rank batch "
                f"{len(ids)} (global_batch={self.global_batch} / dp_size={dp_size})"
            )
        return [ids[i : i + micro_batch_size] for i in range(0, len(ids), micro_batch_size)]

    def epoch_of(self, step: int) -> int:
        """Epoch of the first sample of ``step`` (a step may end in the next epoch)."""
        return self._check_step(step) * self.global_batch // self.num_samples

    def __repr__(self) -> str:
        return (
            f"GlobalBatchSampler(num_samples={self.num_samples}, "
            f"global_batch={self.global_batch}, seed={self.seed})"
        )
