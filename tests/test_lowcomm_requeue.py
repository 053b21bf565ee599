"""Re-queue of a lost low-communication replica's samples (phalanx/parallel/lowcomm/requeue.py):
which steps a loss takes back, how the samples are dealt, and how generations chain."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

from phalanx.data.sampler import GlobalBatchSampler
from phalanx.parallel.lowcomm.requeue import Ledger, extra_micro_batches, rebase, window_start


def lc(method: str = "diloco", h: int = 4, p: int = 1, tau: int = 0) -> SimpleNamespace:
    return SimpleNamespace(method=method, sync_every=h, fragments=p, overlap_steps=tau)


def test_window_is_the_unsynced_round():
    # DiLoCo / NoLoCo: outer steps after steps 3, 7, ... (counts 4, 8, ...).
    assert [window_start(lc(), s) for s in (0, 3, 4, 6, 8)] == [0, 0, 4, 4, 8]
    assert window_start(lc("noloco", h=5), 12) == 10
    # Streaming, H=8, P=4 (a fragment every 2 steps), tau=1: the fragment synced longest ago
    # last completed H steps before the next completion, its snapshot tau steps earlier.
    s = lc("streaming_diloco", h=8, p=4, tau=1)
    assert window_start(s, 3) == 0 and window_start(s, 9) == 1 and window_start(s, 10) == 3


def test_dealt_round_robin_one_micro_batch_per_replica_per_step():
    e = [{"start": 6, "ids": list(range(10)), "mbs": 2, "replicas": 2}]
    assert extra_micro_batches(e, 5, 0) == []
    got = {(s, d): [int(i) for mb in extra_micro_batches(e, s, d) for i in mb]
           for s in range(6, 10) for d in range(2)}
    assert got == {(6, 0): [0, 1], (6, 1): [2, 3], (7, 0): [4, 5], (7, 1): [6, 7],
                   (8, 0): [8, 9], (8, 1): [], (9, 0): [], (9, 1): []}
    # A new generation at step 7 with 3 replicas: what step 6 dealt is gone, the rest restarts.
    assert rebase(e, resume=7, replicas=3) == [
        {"start": 7, "ids": [4, 5, 6, 7, 8, 9], "mbs": 2, "replicas": 3}]
    assert rebase(e, resume=5, replicas=2) == []  # a state from before the entry existed


def _ledger(replicas: int = 4) -> tuple[Ledger, GlobalBatchSampler]:
    sampler = GlobalBatchSampler(1000, 12, seed=3)  # 12: split by 4, 3 or 2 replicas
    return Ledger(lc(h=4), sampler=sampler, replicas=replicas, micro_batch_size=1,
                  deals=True), sampler


def test_a_lost_replicas_window_becomes_one_entry():
    led, sampler = _ledger()
    entries, [w] = led.continue_with(step=6, lost=[2], back={0: 0, 1: 1, 2: None, 3: 3},
                                     replicas=4)
    assert w["steps"] == [4, 6] and w["replica"] == 2
    assert w["ids"] == [*sampler.rank_indices(4, 2, 4), *sampler.rank_indices(5, 2, 4)]
    assert entries == [{"start": 6, "ids": w["ids"], "mbs": 1, "replicas": 4}]


def test_a_replica_lost_while_re_learning_passes_its_share_on():
    """Replica 0 is lost at step 7 after being dealt one of replica 2's samples at step 6:
    its window (steps 4-6, one of them in the previous generation) includes that sample, and
    every sample is still owed exactly once."""
    led, sampler = _ledger()
    first, [w1] = led.continue_with(step=6, lost=[2], back={0: 0, 1: 1, 2: None, 3: 3},
                                    replicas=4)
    second, [w2] = led.continue_with(step=7, lost=[0], back={0: None, 1: 1, 2: 2, 3: 3},
                                     replicas=4)
    assert w2["steps"] == [4, 7]
    own = [i for s in (4, 5, 6) for i in sampler.rank_indices(s, 0, 4).tolist()]
    assert Counter(w2["ids"]) == Counter(own + [w1["ids"][0]])
    # What is still owed: replica 2's samples not yet re-learned (step 6 dealt 4 of them,
    # one to the lost replica 0, which owes it again), and replica 0's window.
    owed = Counter(i for e in second for i in e["ids"])
    assert owed == Counter(w1["ids"][4:]) + Counter(w2["ids"])


def test_a_newcomer_window_starts_when_it_joined():
    led, sampler = _ledger()
    led.continue_with(step=5, lost=[1], back={0: 0, 1: None, 2: 2, 3: 3}, replicas=4)
    _, [w] = led.continue_with(step=7, lost=[1], back={0: 0, 1: None, 2: 2, 3: 3}, replicas=4)
    assert w["steps"] == [5, 7]  # not 4: before step 5 it was its predecessor


def test_shrink_maps_survivors_back_and_rollback_restores_the_list():
    led, sampler = _ledger()
    # Replica 1 leaves at step 6: 3 replicas go on, renumbered 0, 1, 2 <- 0, 2, 3.
    entries, [w] = led.continue_with(step=6, lost=[1], back={0: 0, 1: 2, 2: 3}, replicas=3)
    assert entries[0]["replicas"] == 3
    # New replica 1 (old 2) lost at step 7: its window spans both generations, in each one's
    # numbering and split.
    _, [w2] = led.continue_with(step=7, lost=[1], back={0: 0, 1: None}, replicas=2)
    old = [*sampler.rank_indices(4, 2, 4), *sampler.rank_indices(5, 2, 4)]
    new = [*sampler.rank_indices(6, 1, 3)] + [int(i) for mb in
                                             extra_micro_batches(entries, 6, 1) for i in mb]
    assert w2["steps"] == [4, 7] and w2["ids"] == [*old, *new]
    # A rollback to step 6's checkpoint: the list as it was dealt from step 6, over the
    # replicas the rolled-back generation has; to step 3: nothing was owed then.
    assert led.roll_back(step=6, replicas=2) == [{**entries[0], "replicas": 2}]
    assert led.roll_back(step=3, replicas=2) == []


def test_the_pipeline_runtime_records_but_does_not_deal():
    sampler = GlobalBatchSampler(1000, 8, seed=3)
    led = Ledger(lc(h=4), sampler=sampler, replicas=2, micro_batch_size=1, deals=False)
    entries, [w] = led.continue_with(step=6, lost=[1], back={0: 0, 1: None}, replicas=2)
    assert entries == [] and w["requeued"] is False and len(w["ids"]) == 8
