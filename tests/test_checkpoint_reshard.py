"""Save on one layout, continue on another: losses match the uninterrupted run.

Real gloo worlds (processes). Save with (dp=2, pp=2) after 3 steps and keep
training to step 6 for the reference; then load that checkpoint on the same
layout (bit-identical losses), on dp=4, pp=4, one process, and under ZeRO
stages (losses within float tolerance: a different reduction order).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phalanx.config import validate
from phalanx.launch.cli import compose_recipe
from phalanx.launch.world import run_world
from phalanx.orchestrator.corpus import corpus_to_dict, prepare_corpus
from phalanx.orchestrator.plan import plan_single_node

pytestmark = pytest.mark.e2e

MODEL = ["model.hidden_size=64", "model.intermediate_size=96", "model.num_hidden_layers=4",
         "model.num_attention_heads=4", "model.num_key_value_heads=2",
         "model.max_position_embeddings=64"]
BASE = ["data=synthetic", "data.synthetic_tokens=40000", "trainer.seq_len=16",
        "trainer.global_batch=8", "parallel.micro_batch_size=1", "trainer.steps=6",
        "trainer.eval_every=100", "optim.warmup_steps=2", *MODEL]
SAVE, END = 3, 6


def job(name: str, world: int, overrides: list[str], *, root: Path, **extra) -> dict:
    run = validate(compose_recipe([*BASE, f"cluster.devices_per_node={world}", *overrides]))
    corpus = corpus_to_dict(prepare_corpus(run))
    plan = plan_single_node(run, generation=0, backend="gloo", cores=2, corpus=corpus)
    return {"name": name, "run": run.to_dict(), "schedule": plan.schedule, "corpus": corpus,
            "root": str(root), **extra}


def world(jobs: list[dict], n: int, label: str) -> dict:
    return run_world("tests.helpers.ckpt_world", {"jobs": jobs}, world=n, timeout=240,
                     label=label)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    out = world([job("ref", 4, ["parallel.dp=2", "parallel.pp=2"], root=root,
                     steps=[0, END], save_at=[SAVE])], 4, "save dp2 pp2")
    ckpt = root / f"step_{SAVE:09d}"
    assert (ckpt / "manifest.json").is_file()
    return root, ckpt, out["ref"]["losses"][SAVE:]


def test_same_layout_resume_is_bit_identical(reference):
    root, ckpt, ref = reference
    out = world([job("same", 4, ["parallel.dp=2", "parallel.pp=2"], root=root,
                     steps=[SAVE, END], load=str(ckpt))], 4, "resume dp2 pp2")
    assert out["same"]["losses"] == ref


@pytest.mark.parametrize("name,n,overrides", [
    ("dp4", 4, ["parallel.dp=4"]),
    ("pp4", 4, ["parallel.pp=4"]),
    ("zero2_dp4", 4, ["parallel.dp_shard=4", "parallel.zero.stage=2"]),
    ("zero3_dp2_pp2", 4, ["parallel.dp_shard=2", "parallel.zero.stage=3", "parallel.pp=2"]),
    ("tp2", 2, ["parallel.tp=2"]),
    ("single", 1, []),
])
def test_reshard_continues_the_run(reference, name, n, overrides):
    root, ckpt, ref = reference
    out = world([job(name, n, overrides, root=root, steps=[SAVE, END], load=str(ckpt))], n,
                f"resume {name}")
    assert out[name]["losses"] == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_zero3_checkpoint_loads_on_plain_dp(tmp_path):
    """ZeRO shards (flat ranges across parameters) saved as boxes, loaded whole."""
    zero = job("z", 4, ["parallel.dp_shard=4", "parallel.zero.stage=3"], root=tmp_path,
               steps=[0, END], save_at=[SAVE])
    out = world([zero], 4, "save zero3 dp4")
    ref = out["z"]["losses"][SAVE:]
    ckpt = tmp_path / f"step_{SAVE:09d}"
    out = world([job("dp2", 2, ["parallel.dp=2"], root=tmp_path, steps=[SAVE, END],
                     load=str(ckpt))], 2, "resume dp2 from zero3")
    assert out["dp2"]["losses"] == pytest.approx(ref, rel=1e-5, abs=1e-6)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["step"] == SAVE and manifest["layout"]["dp_shard"] == 4
