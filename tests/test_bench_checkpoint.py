"""`phalanx bench checkpoint` end to end on a tiny model: 2 pinned workers, one round of every
method (torch.save + fsync, DCP async_save, phalanx memory and disk), the every-step blocks,
the JSON document and its figures."""

import json
import math

import pytest

from phalanx.bench import BENCHES, write_result
from phalanx.bench.checkpoint import METHODS, Case, bench

pytestmark = pytest.mark.e2e

TINY = Case(model=("model.hidden_size=64", "model.intermediate_size=96",
                   "model.num_hidden_layers=2", "model.num_attention_heads=4",
                   "model.num_key_value_heads=4"),
            seq_len=16, global_batch=4, micro_batch=2, every=2, rounds=1, pairs=1, pair_steps=2,
            stress_steps=2, warmup=1)
GOALED = ("blocking_vs_torch_save", "blocking_vs_dcp_async", "throughput_cost_memory_every_step",
          "state_mb")


def test_checkpoint_bench_tiny_case(tmp_path):
    doc = bench(TINY, quick=True, timeout=120, root=tmp_path)
    out = tmp_path / "bench.json"
    write_result(doc, out)
    doc = json.loads(out.read_text())
    assert set(doc) == {"bench", "quick", "machine", "runs", "figures"}
    assert doc["bench"] == "checkpoint" and doc["quick"] is True and "checkpoint" in BENCHES
    figs = doc["figures"]
    for key in GOALED:
        assert isinstance(figs[key], float), key
    assert all(isinstance(v, float) and math.isfinite(v) for v in figs.values()), figs
    for key in ("blocking_vs_torch_save", "blocking_vs_dcp_async", "blocking_s_phalanx",
                "durable_s_phalanx", "durable_s_dcp_async", "durable_s_torch_save"):
        assert figs[key] > 0, key

    setup, *blocks = doc["runs"]
    assert setup["kind"] == "setup" and setup["world"] == 2
    # DDP replicates the state; each rank snapshots all of it, 12 bytes a parameter and more.
    assert setup["state_bytes_per_rank"] == [setup["state_bytes"]] * 2
    assert setup["state_bytes"] >= 12 * setup["parameters"]
    assert figs["state_mb"] == pytest.approx(setup["state_bytes"] / 2**20)
    assert set(setup["fsync"]) == set(METHODS[1:])
    timed = [b for b in blocks if b["kind"] == "block"]
    assert sorted(b["method"] for b in timed) == sorted(METHODS)
    for b in timed:
        steps = TINY.pair_steps if b["method"] in ("baseline", "phalanx_memory") else TINY.every
        assert b["steps"] == steps and len(b["unit_s"]) == len(b["cpu_s"]) == steps
        assert b["window_s"] > 0 and b["tokens_per_s"] > 0 and b["cpu_window_s"] > 0
        n = {"baseline": 0, "phalanx_memory": steps}.get(b["method"], 1)
        assert len(b["checkpoints"]) == n, b["method"]
        for c in b["checkpoints"]:
            assert c["blocking_s"] >= 0 and len(c["blocking_s_per_rank"]) == 2
            if b["method"] in ("torch_save", "dcp_async", "phalanx"):
                # Every method wrote the whole state once (within DCP's metadata overhead).
                assert c["durable_s"] >= c["blocking_s"] * 0.5
                assert setup["state_bytes"] * 0.9 < c["bytes"] < setup["state_bytes"] * 1.5
    stress = [b for b in blocks if b["kind"] == "stress"]
    assert [b["method"] for b in stress] == ["baseline", "dcp_async", "phalanx", "baseline"]
    assert [len(b["checkpoints"]) for b in stress] == [0, TINY.stress_steps, TINY.stress_steps, 0]
    phalanx = [b for b in blocks if b["method"] == "phalanx"]
    assert all(b["persister_cpu_s"] >= 0 for b in phalanx)
    assert not list(tmp_path.glob("phalanx-ckbench-*"))  # checkpoints removed afterwards
