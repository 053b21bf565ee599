"""Asynchronous multi-level checkpoints on real worker processes (gloo, 2 ranks, pp=2).

Memory snapshots every step, a buddy's copy and a disk checkpoint every 2 steps, written
by the background persister while training goes on; a synchronous save of the same
steps into another directory is the reference.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from phalanx.checkpoint import store
from tests.test_checkpoint_reshard import job, world

pytestmark = pytest.mark.e2e

ASYNC = ["checkpoint.memory_every=1", "checkpoint.disk_every=2", "checkpoint.peer_every=2",
         "checkpoint.keep_last=5"]


@pytest.fixture(scope="module")
def async_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("async")
    (root / "dump").mkdir()
    out = world([job("a", 2, ["parallel.pp=2", *ASYNC], root=root / "ck", steps=[0, 6],
                     save_at=[2, 4, 6], sync_root=str(root / "sync"), snapshot=True,
                     dump=str(root / "dump"))], 2, "async checkpoints pp2")
    return root, out["a"]


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("step", [2, 4, 6])
def test_persisted_equals_synchronous_copy_bit_for_bit(async_run, step):
    root, _ = async_run
    persisted = store.read_tensors(store.step_dir(root / "ck", step))
    sync = store.read_tensors(store.step_dir(root / "sync", step))
    _same(persisted, sync)
    assert int(persisted["trainer/step"]) == step


def test_every_rank_reports_its_saves_and_blocking_time(async_run):
    _, res = async_run
    for r in res["ranks"]:
        st = r["stats"]
        assert [s["step"] for s in st["saved"]] == [2, 4, 6] and not st["failed"]
        assert st["snapshots"] == 6 and len(st["blocking_s"]) == 6
        assert st["state_bytes"] > 0 and st["peer_steps"] == [2, 4, 6]


def test_buddy_holds_its_wards_snapshot(async_run):
    root, res = async_run
    for rank in (0, 1):
        peer = torch.load(root / "dump" / f"peer{rank}.pt", weights_only=False)
        ward = peer["rank"]
        assert ward != rank and res["ranks"][ward]["buddy"] == rank
        mem = torch.load(root / "dump" / f"mem{ward}.pt", weights_only=False)
        assert peer["step"] == mem["step"] == 6
        pieces = {(name, off): t for name, b in mem["state"].items()
                  for off, t in b.pieces.items()}
        got = {(name, tuple(off)): t for (name, off), t in peer["state"].items()}
        assert set(got) == set(pieces)
        for k, t in pieces.items():
            assert torch.equal(got[k], t), k


def test_retention_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4, 5):
        d = store.step_dir(tmp_path, step)
        store.save({"x": torch.full((3,), float(step))}, d, meta={"step": step})
    os.makedirs(store.step_dir(tmp_path, 6))  # a write in flight: no manifest yet
    gone = store.prune(tmp_path, keep_last=2, keep_every=2)
    assert sorted(int(Path(p).name[5:]) for p in gone) == [1, 3]
    assert [int(p.name[5:]) for p in store.list_checkpoints(tmp_path)] == [6, 5, 4, 2]
