"""A checkpoint is complete or invisible (DESIGN.md invariant 4), and checkpoint failures
never stop training: torn, truncated, bit-flipped and manifest-less checkpoints are
skipped for the previous good one; a persister SIGKILLed mid-write and a disk that
refuses writes leave the earlier checkpoint loadable while training runs to the end."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from phalanx.checkpoint import store
from phalanx.checkpoint.reshard import resolve
from tests.test_checkpoint_reshard import job, world


def _two_checkpoints(root):
    for step in (2, 4):
        store.save({"w": torch.full((64, 8), float(step)), "trainer/step": torch.tensor(step)},
                   store.step_dir(root, step), meta={"step": step})
    return store.step_dir(root, 4)


def _shard(path):
    return next(p for p in path.iterdir() if p.suffix == ".distcp")


def _truncate(path):
    f = _shard(path)
    f.write_bytes(f.read_bytes()[:-7])


def _flip(path):
    f = _shard(path)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def _no_manifest(path):
    (path / store.MANIFEST).unlink()


def _evil_metadata(path):
    # A pickle that would run code if anything unpickled it before checking its checksum.
    (path / ".metadata").write_bytes(pickle.dumps(SystemExit))


@pytest.mark.parametrize("damage,why", [(_truncate, "bytes"), (_flip, "checksum"),
                                        (_no_manifest, "no manifest.json"),
                                        (_evil_metadata, ".metadata")])
def test_damaged_checkpoint_is_skipped_for_the_previous(tmp_path, damage, why):
    newest = _two_checkpoints(tmp_path)
    damage(newest)
    with pytest.raises(store.CheckpointError, match=why):
        store.verify(newest)
    path, manifest, skipped = resolve("latest", tmp_path)
    assert path == store.step_dir(tmp_path, 2) and manifest["step"] == 2
    assert skipped and skipped[0][0] == str(newest) and why in skipped[0][1]
    state = {"w": torch.zeros(64, 8), "trainer/step": torch.tensor(0)}
    store.load(state, path)
    assert int(state["trainer/step"]) == 2 and torch.equal(state["w"], torch.full((64, 8), 2.0))
    with pytest.raises(store.CheckpointError):
        store.load(state, newest)  # never read past a failed verification


def test_signed_manifest_detects_tampering(tmp_path):
    path = store.step_dir(tmp_path, 1)
    store.save({"w": torch.ones(4)}, path, meta={"step": 1}, token="secret")
    store.verify(path, token="secret")
    m = json.loads((path / store.MANIFEST).read_text())
    m["step"] = 99
    (path / store.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(store.CheckpointError, match="signature"):
        store.verify(path, token="secret")


def test_nothing_to_resume_is_a_clear_error(tmp_path):
    store.step_dir(tmp_path, 3).mkdir(parents=True)
    with pytest.raises(store.CheckpointError, match="no complete checkpoint"):
        resolve("latest", tmp_path)


@pytest.mark.e2e
def test_persister_killed_mid_write_and_full_disk_keep_training(tmp_path):
    disk = ["checkpoint.disk_every=2", "checkpoint.keep_last=10",
            "checkpoint.persist_timeout_s=20"]
    base = job("base", 2, ["parallel.dp=2"], root=tmp_path / "ck", steps=[0, 2], save_at=[2])
    full = job("full", 2, ["parallel.dp=2", *disk], root=tmp_path / "ck", steps=[2, 6],
               load=str(store.step_dir(tmp_path / "ck", 2)), snapshot=True, disk_limit=4096)
    kill = job("kill", 2, ["parallel.dp=2", *disk], root=tmp_path / "ck2", steps=[2, 8],
               load=str(store.step_dir(tmp_path / "ck", 2)), snapshot=True,
               kill_persister={"rank": 1, "step": 6})
    out = world([base, full, kill], 2, "checkpoint faults")
    # Full disk: every write failed on every rank, training ran to the end, nothing torn is
    # visible and the earlier checkpoint still loads.
    assert len(out["full"]["losses"]) == 4
    for r in out["full"]["ranks"]:
        assert [e["step"] for e in r["events"] if e["event"] == "checkpoint_failed"] == [4, 6]
        assert r["events"][0]["command"] == "save" and "\n" not in r["events"][0]["error"]
    for step in (4, 6):
        assert not (store.step_dir(tmp_path / "ck", step) / store.MANIFEST).exists()
    path, manifest, _ = resolve("latest", tmp_path / "ck")
    assert manifest["step"] == 2
    # Persister SIGKILLed while writing step 6: step 4 is the newest good checkpoint.
    assert len(out["kill"]["losses"]) == 6
    k1 = out["kill"]["ranks"][1]["events"]
    assert any(e["event"] == "checkpoint_failed" and e["command"] == "persister" for e in k1)
    assert [s["step"] for s in out["kill"]["ranks"][0]["stats"]["saved"]] == [4]
    path, manifest, skipped = resolve("latest", tmp_path / "ck2")
    assert manifest["step"] == 4 and skipped and "step_000000006" in skipped[0][0]
    assert int(store.read_tensors(path, prefix="trainer/")["trainer/step"]) == 4
