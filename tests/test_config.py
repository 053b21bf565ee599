"""Recipes that cannot run are rejected before any worker starts, with the key and the fix."""

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from phalanx.config import ConfigError, RunConfig, validate
from phalanx.launch.cli import compose_recipe


def check(overrides: list[str]) -> RunConfig:
    return validate(compose_recipe(overrides))


def test_default_recipe_is_valid_and_fills_dp():
    run = check([])
    assert run.parallel.dp_replicate == 2 and run.parallel.dp == 2
    assert run.world_size == 2
    assert run.grad_accum == run.trainer.global_batch // (2 * run.parallel.micro_batch_size)


def test_launcher_flags_become_recipe_keys():
    run = check(["--nproc-per-node", "4", "nodes=1", "trainer.global_batch=32"])
    assert run.cluster.devices_per_node == 4 and run.parallel.dp_replicate == 4


@pytest.mark.parametrize("overrides,message", [
    (["model.num_attention_heads=3"], "model.hidden_size=128 is not divisible by "
                                      "model.num_attention_heads=3"),
    (["model.num_key_value_heads=3"], "model.num_attention_heads=4 is not divisible by "
                                      "model.num_key_value_heads=3"),
    (["trainer.global_batch=10"], "trainer.global_batch=10 is not divisible by "
                                  "parallel.micro_batch_size=4 x data-parallel size 2"),
    (["parallel.dp=4"], "set --nproc-per-node 4 or change parallel.dp"),
    (["parallel.dp=2", "parallel.dp_replicate=1"], "disagree; set only one of them"),
    (["parallel.dp_shard=2"], "parallel.dp_shard=2 shards model state with ZeRO: set "
                              "parallel.zero.stage=1, 2 or 3"),
    (["parallel.zero.stage=2"], "shards within parallel.dp_shard, which is 1"),
    (["parallel.zero.stage=4"], "parallel.zero.stage=4: choose 0, 1, 2 or 3"),
    (["parallel.zero.stage=1", "parallel.dp_shard=2", "parallel.tp=2", "--nproc-per-node", "4"],
     "ZeRO over tensor-parallel shards is not available"),
    (["precision.reduce=bf16"], "precision.reduce=bf16 compresses gradients with torch's bf16 "
                                "hook, which needs CUDA/NCCL"),
    (["parallel.recompute=some"], "parallel.recompute='some': choose none, selective or full"),
    (["--nproc-per-node", "4", "parallel.pp=3"], "the world of 4 workers is not divisible by "
                                                 "tp*pp*dp_shard=3"),
    (["--nproc-per-node", "3", "parallel.pp=3", "trainer.global_batch=12"],
     "model.num_hidden_layers=4 cannot be cut into pp*vpp = 3*1 = 3 equal stages"),
    (["--nproc-per-node", "8", "parallel.tp=8", "trainer.global_batch=4"],
     "model.num_attention_heads=4 is not divisible by parallel.tp=8"),
    (["parallel.tp=2", "model.num_key_value_heads=1"],
     "model.num_key_value_heads=1 is not divisible by parallel.tp=2"),
    (["parallel.pp=2", "parallel.vpp=2", "parallel.schedule=interleaved_1f1b",
      "trainer.global_batch=12"], "needs the number of micro-batches (3 = global_batch"),
    (["parallel.pp=2", "trainer.global_batch=4"], "1 micro-batches cannot fill a pipeline of "
                                                  "parallel.pp=2"),
    (["parallel.pp=2", "parallel.vpp=2"], "parallel.vpp=2 needs an interleaved schedule"),
    (["parallel.sp=true"], "it needs parallel.tp > 1"),
    (["parallel.schedule=zigzag"], "parallel.schedule='zigzag': choose one of"),
    (["trainer.seq_len=1024"], "trainer.seq_len=1024 exceeds model.max_position_embeddings=512"),
    (["precision.compute=fp16"], "precision.compute='fp16': choose one of fp32, bf16"),
    (["data=files", "data.path=/nonexistent/corpus.txt"], "data.path=/nonexistent/corpus.txt "
                                                          "does not exist"),
    (["data=files"], "data.source=files needs data.path="),
    (["model.vocab_size=???"], "recipe keys without a value: model.vocab_size"),
    (["trainer.steps=0"], "trainer.steps=0 must be positive"),
    (["fault.heartbeat_timeout_s=1.5"], "must exceed twice fault.heartbeat_s"),
])
def test_bad_recipe_rejected_with_reason(overrides, message):
    with pytest.raises(ConfigError) as e:
        check(overrides)
    assert message in str(e.value)


def test_unknown_key_and_wrong_type_are_named_by_hydra():
    with pytest.raises(ConfigCompositionException) as e:
        compose_recipe(["trainer.stpes=3"])
    assert "trainer.stpes" in str(e.value)
    assert "Key 'stpes' not in 'TrainerConfig'" in str(e.value.__cause__)
    with pytest.raises(ConfigCompositionException) as e:
        compose_recipe(["trainer.steps=abc"])
    assert isinstance(e.value.__cause__, ValidationError)
    assert "trainer.steps" in str(e.value.__cause__) and "abc" in str(e.value.__cause__)


def test_elastic_nnodes_lays_out_min_nodes():
    # --nnodes MIN:MAX: the layout is for MIN nodes; nodes beyond MIN join as spare nodes.
    assert compose_recipe(["--nnodes", "2:4"]).cluster.nodes == 2
    with pytest.raises(ConfigError, match="1 <= MIN <= MAX"):
        compose_recipe(["--nnodes", "4:2"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "phalanx", "run", *args], capture_output=True,
                          text=True, timeout=60)


def test_cli_exit_codes_and_messages(tmp_path):
    bad = _cli("trainer.global_batch=10", "--run-dir", str(tmp_path / "a"))
    assert bad.returncode == 2
    assert "phalanx: error: trainer.global_batch=10 is not divisible" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not (tmp_path / "a" / "metrics.jsonl").exists()  # nothing started
    unknown = _cli("trainer.stpes=3")
    assert unknown.returncode != 0 and "trainer.stpes" in unknown.stderr
    missing_group = _cli("model=huge")
    assert missing_group.returncode != 0 and "model/huge" in missing_group.stderr


def test_cli_help_lists_groups_and_flags():
    out = _cli("--help")
    assert out.returncode == 0
    for text in ("model: gpt3_175b, llama_125m, llama_1b, llama_70b, llama_7b, small, tiny",
                 "--nproc-per-node", "--run-dir", "--standalone", "--nnodes"):
        assert text in out.stdout


def test_cfg_job_prints_composed_recipe():
    out = _cli("--cfg", "job", "model=small", "optim.lr=1e-3")
    assert out.returncode == 0
    assert "hidden_size: 320" in out.stdout and "lr: 0.001" in out.stdout


def test_runconfig_round_trips_through_json_dict():
    run = check(["model=small"])
    assert RunConfig.from_dict(run.to_dict()) == run
