"""`parallel.zero.backend=deepspeed`: DeepSpeed ZeRO 2/3 and ZeRO-Offload (CPU Adam) train the
same loss curve as the native DDP path, and recipes / user DeepSpeed JSON map or are rejected.

Parity tolerance (fp32): rel 1e-5 per step on loss and gradient norm. Both paths run the same
model init, samples, AdamW and schedule, so they differ only in rounding: DDP all-reduces
the accumulated gradient once while ZeRO reduces each micro-batch and accumulates the reduced
partitions (another order of fp32 additions), DeepSpeed sums the gradient norm in fp64, and
CPU Adam is DeepSpeed's own SIMD kernel. Each is ~1e-7 relative; measured over 10 steps the
loss differs by < 1e-7 and the norm by < 1e-6 relative, so 1e-5 keeps a 10x margin and is
still 1000x finer than the loss change between steps (~3e-2) or a wrong gradient scale (2x).

The first DeepSpeed use on a machine JIT-compiles two C++ ops into $TORCH_EXTENSIONS_DIR
(minutes on 2 cores, once per machine: ~/.cache/phalanx/torch_extensions); the `ds_ops`
fixture does it here, seconds when cached.
"""

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

from phalanx.config import ConfigError, validate  # noqa: E402
from phalanx.launch.cli import compose_recipe  # noqa: E402
from phalanx.orchestrator.corpus import corpus_to_dict, prepare_corpus  # noqa: E402
from phalanx.orchestrator.plan import plan_single_node  # noqa: E402
from phalanx.parallel.deepspeed_backend import deepspeed_config, load_user_zero_block  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Two accumulation steps (global 8 = micro 2 x dp 2 x 2) so the gas compensation is exercised.
FAST = ["data=synthetic", "trainer=smoke", "parallel.micro_batch_size=2", "logging.console=none"]
DS = ["parallel.zero.backend=deepspeed"]
REL = 1e-5
NAN_STEP, STOP_STEP, STEPS = 10, 11, 12  # harness cases run 2 steps past the compared 10


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- recipe -> DeepSpeed config; the user's zero_optimization block --------------------------

def _run(*overrides: str):
    return validate(compose_recipe([*FAST, *overrides]))


def test_generated_config_from_recipe():
    run = _run(*DS, "parallel.zero.stage=2")
    cfg = deepspeed_config(run, dp_size=2)
    assert cfg["train_batch_size"] == 8 and cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["gradient_clipping"] == 1.0
    assert cfg["zero_optimization"] == {"stage": 2}
    # Client optimizer and scheduler; fp32 recipe: no precision section at all.
    assert not {"optimizer", "scheduler", "bf16", "fp16", "torch_autocast"} & cfg.keys()
    assert deepspeed_config(run, dp_size=1)["gradient_accumulation_steps"] == 4

    off = deepspeed_config(_run(*DS, "parallel.zero.stage=3", "parallel.zero.offload=true"),
                           dp_size=2)
    assert off["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    bf = deepspeed_config(_run(*DS, "parallel.zero.stage=1", "precision=bf16"), dp_size=2)
    # fp32 parameters + bf16 autocast (the recipe's meaning), not DeepSpeed's bf16 parameters.
    assert "bf16" not in bf and bf["torch_autocast"] == {
        "enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    bf_reduce = deepspeed_config(_run(*DS, "parallel.zero.stage=1", "precision=bf16",
                                      "precision.reduce=bf16"), dp_size=2)
    assert bf_reduce["torch_autocast"]["lower_precision_safe_modules"] == [
        "torch.nn.modules.linear.Linear"]
    assert deepspeed_config(_run(*DS, "parallel.zero.stage=2", "trainer.grad_clip=0"),
                            dp_size=2)["gradient_clipping"] == 0.0


def _user_file(tmp_path: Path, content) -> Path:
    path = tmp_path / "ds_config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_user_zero_block_whole_config_or_block(tmp_path):
    full = {"train_batch_size": "auto", "optimizer": {"type": "AdamW"}, "fp16": {"enabled": True},
            "zero_optimization": {
                "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                "offload_param": {"device": "none"}, "overlap_comm": True,
                "contiguous_gradients": True, "reduce_bucket_size": 5e5,
                "allgather_bucket_size": 2e8, "reduce_scatter": True, "sub_group_size": "auto",
                "stage3_prefetch_bucket_size": "auto", "max_live_parameters": 1e9,
                "stage3_param_persistence_threshold": 0, "zero_hpz_partition_size": 1,
                "zero_quantized_weights": False, "stage3_gather_16bit_weights_on_model_save": True}}
    block = load_user_zero_block(_user_file(tmp_path, full), stage=3, offload=True)
    assert block == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                     "overlap_comm": True, "contiguous_gradients": True,
                     "reduce_bucket_size": 500000, "allgather_bucket_size": 200000000,
                     "reduce_scatter": True, "stage3_max_live_parameters": 1000000000,
                     "stage3_param_persistence_threshold": 0,
                     "stage3_gather_16bit_weights_on_model_save": True}
    # The file may be the block itself; the recipe's offload/stage then fill the config.
    path = _user_file(tmp_path, {"stage": 2, "reduce_bucket_size": 1000, "cpu_offload": False})
    assert load_user_zero_block(path) == {"stage": 2, "reduce_bucket_size": 1000,
                                          "offload_optimizer": {"device": "none"}}
    run = _run(*DS, "parallel.zero.stage=2", f"parallel.zero.deepspeed_config={path}")
    assert deepspeed_config(run, dp_size=2)["zero_optimization"] == {"stage": 2,
                                                                     "reduce_bucket_size": 1000}


@pytest.mark.parametrize("block,message", [
    ({"offload_param": {"device": "nvme", "nvme_path": "/nvme"}},
     'zero_optimization.offload_param={"device": "nvme", "nvme_path": "/nvme"}: parameter '
     "offload (to CPU or NVMe) is not supported; phalanx offloads optimizer state only "
     "(parallel.zero.offload=true); remove offload_param"),
    ({"offload_param": {"device": "cpu"}}, "parameter offload (to CPU or NVMe) is not supported"),
    ({"offload_optimizer": {"device": "nvme"}}, 'zero_optimization.offload_optimizer.device='
     '"nvme": only CPU optimizer offload (ZeRO-Offload) is supported, not NVMe; use "device": '
     '"cpu" or "none"'),
    ({"offload_optimizer": {"device": "cpu", "nvme_path": "/local_nvme"}},
     'zero_optimization.offload_optimizer.nvme_path="/local_nvme": NVMe offload (ZeRO-Infinity) '
     "is not supported; remove offload_optimizer.nvme_path"),
    ({"zero_quantized_weights": True}, "zero_optimization.zero_quantized_weights=true: ZeRO++ "
     "quantized weights (qwZ) are not supported; remove zero_quantized_weights (or set it to "
     "false)"),
    ({"zero_quantized_gradients": True}, "ZeRO++ quantized gradients (qgZ) are not supported"),
    ({"zero_hpz_partition_size": 8}, "zero_optimization.zero_hpz_partition_size=8: ZeRO++ "
     "hierarchical partitioning (hpZ) is not supported; for a secondary partition use "
     "parallel.dp_replicate x parallel.dp_shard with parallel.zero.backend=torch; remove "
     "zero_hpz_partition_size (or set it to 1)"),
    ({"mics_shard_size": 4}, "MiCS sharding is not supported"),
    ({"compute_grad_norm": False}, "skips non-finite steps by the global gradient norm"),
    ({"stage": 3}, "zero_optimization.stage=3: the recipe has parallel.zero.stage=2; set "
     "parallel.zero.stage=3 (or stage 2 in the file) so both agree"),
    ({"offload_optimizer": {"device": "cpu"}}, 'zero_optimization.offload_optimizer.device="cpu": '
     "the recipe has parallel.zero.offload=false; set parallel.zero.offload=true so both agree"),
    ({"reduce_bucket_size": "big"}, 'zero_optimization.reduce_bucket_size="big": it must be a '
     "non-negative whole number"),
    ({"overlap_comm": "yes"}, "zero_optimization.overlap_comm=\"yes\": it must be true or false"),
    ({"stage3_fancy_knob": 1}, "zero_optimization.stage3_fancy_knob=1: phalanx's DeepSpeed "
     "backend does not support this key; remove it (supported: stage, offload_optimizer, "),
])
def test_user_zero_block_rejects_with_key_and_fix(tmp_path, block, message):
    path = _user_file(tmp_path, {"zero_optimization": block})
    with pytest.raises(ValueError) as e:
        load_user_zero_block(path, stage=2, offload=False)
    assert message in str(e.value) and str(path) in str(e.value)


def test_user_zero_block_unreadable(tmp_path):
    for content in ("{not json", '{"stage": 2, "stage": 3}', "[1]"):
        with pytest.raises(ValueError, match="ds_config.json: "):
            load_user_zero_block(_user_file(tmp_path, content))


# --- validate ---------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    ([*DS, "parallel.zero.stage=2", "parallel.pp=2"], "parallel.zero.backend=deepspeed with "
     "parallel.pp=2, parallel.tp=1: pipeline/TP layouts use the torch backend (parallel.zero."
     "backend=torch); DeepSpeed runs plain data-parallel layouts and is non-elastic."),
    ([*DS, "parallel.zero.stage=2", "parallel.tp=2"], "pipeline/TP layouts use the torch backend"),
    ([*DS, "parallel.zero.stage=2", "parallel.dp_shard=2"], "parallel.dp_shard=2 with parallel."
     "zero.backend=deepspeed: DeepSpeed shards over all data-parallel ranks; set "
     "parallel.dp_shard=1"),
    ([*DS], "parallel.zero.backend=deepspeed with parallel.zero.stage=0 is plain data "
     "parallelism: use parallel.zero.backend=torch (DDP)"),
    (["parallel.zero.offload=true"], "parallel.zero.offload=true (optimizer state and step on "
     "the CPU, DeepSpeed's CPU Adam) needs parallel.zero.backend=deepspeed."),
    (["parallel.zero.deepspeed_config=/nonexistent.json"], "parallel.zero.deepspeed_config is "
     "read by the DeepSpeed backend only: set parallel.zero.backend=deepspeed"),
    ([*DS, "parallel.zero.stage=2", "parallel.zero.deepspeed_config=/nonexistent.json"],
     "parallel.zero.deepspeed_config=/nonexistent.json does not exist"),
])
def test_validate_rejects(overrides, message):
    with pytest.raises(ConfigError) as e:
        _run(*overrides)
    assert message in str(e.value)


def test_validate_loads_the_user_file(tmp_path, monkeypatch):
    _user_file(tmp_path, {"zero_optimization": {"stage": 2, "zero_quantized_weights": True}})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="parallel.zero.deepspeed_config: .*ds_config.json: "
                       "zero_optimization.zero_quantized_weights=true: ZeRO"):
        _run(*DS, "parallel.zero.stage=2", "parallel.zero.deepspeed_config=ds_config.json")
    _user_file(tmp_path, {"zero_optimization": {"stage": 2, "overlap_comm": False}})
    run = _run(*DS, "parallel.zero.stage=2", "parallel.zero.deepspeed_config=ds_config.json")
    assert run.parallel.zero.deepspeed_config == str(tmp_path / "ds_config.json")  # absolute


def test_deepspeed_layout_is_plain_data_parallel_in_the_plan():
    """No dp_shard>1 needed for ZeRO (DeepSpeed shards the whole dp group), no pipeline schedule."""
    run = _run(*DS, "parallel.zero.stage=3")
    plan = plan_single_node(run, generation=0, backend="gloo", cores=2, corpus={})
    assert plan.schedule is None and plan.layout.dp == 2 and plan.layout.dp_shard == 1
    torch_zero = _run("parallel.zero.stage=3", "parallel.dp_shard=2")
    assert plan_single_node(torch_zero, generation=0, backend="gloo", cores=2,
                            corpus={}).schedule is not None


# --- real worker processes --------------------------------------------------------------------

@pytest.fixture(scope="module")
def ds_ops():
    """DeepSpeed's JIT ops, built once into $TORCH_EXTENSIONS_DIR (seconds when cached)."""
    proc = subprocess.run([sys.executable, "-m", "phalanx.parallel.deepspeed_backend", "prebuild"],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _harness_spec(out: Path) -> list[str]:
    """Stage 3 (with a user zero_optimization block) and stage 2 + offload for one 2-rank world
    (`python -m tests.test_deepspeed`); returns its command line."""
    user = out / "user_zero.json"
    # Persistence 0: stage 3 partitions every parameter (the tiny model's would all stay whole).
    user.write_text(json.dumps({"zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0, "overlap_comm": True,
        "reduce_bucket_size": 200000, "stage3_prefetch_bucket_size": "auto"}}))
    cases = {"stage3": [*DS, "parallel.zero.stage=3", f"parallel.zero.deepspeed_config={user}"],
             "offload": [*DS, "parallel.zero.stage=2", "parallel.zero.offload=true"]}
    runs = {name: _run(*overrides) for name, overrides in cases.items()}
    corpus = corpus_to_dict(prepare_corpus(runs["stage3"]))
    spec = {"corpus": corpus, "out": str(out),
            "cases": [{"name": name, "run": run.to_dict()} for name, run in runs.items()]}
    (out / "spec.json").write_text(json.dumps(spec))
    return [sys.executable, "-m", "tests.test_deepspeed"]


@pytest.fixture(scope="module")
def worlds(ds_ops, tmp_path_factory):
    """At once (a small run is mostly start-up, which overlaps well on 2 cores): `phalanx run`
    of the native DDP recipe and of DeepSpeed stage 2, and the harness world, whose cases run
    12 steps: 10 compared with the native run, a NaN loss on rank 1 alone at step 10, and a
    stop requested on rank 0 alone at step 11."""
    base = tmp_path_factory.mktemp("ds")
    cmd = _harness_spec(base)  # builds the corpus before the runs look for it
    audit = ["trainer.audit_samples=true"]
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    files = contextlib.ExitStack()
    try:
        for name, args in (("native", [*FAST, *audit, "parallel.zero.backend=torch"]),
                           ("ds2", [*FAST, *audit, *DS, "parallel.zero.stage=2"])):
            logs[name] = base / f"{name}.out"
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "phalanx", "run", *args, "--run-dir", str(base / name)],
                stdout=files.enter_context(open(logs[name], "w")), stderr=subprocess.STDOUT)
        port = _free_port()
        for rank in range(2):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1",
                   "DS_TEST_SPEC": str(base / "spec.json")}
            logs[f"rank{rank}"] = base / f"rank{rank}.log"
            out = files.enter_context(open(logs[f"rank{rank}"], "w"))
            procs[f"rank{rank}"] = subprocess.Popen(cmd, env=env, stdout=out,
                                                    stderr=subprocess.STDOUT, cwd=REPO)
        for name, p in procs.items():
            p.wait(timeout=240)
            worker_logs = "".join(f.read_text()[-2000:] for f in base.glob(f"{name}/logs/*.log"))
            assert p.returncode == 0, f"{name}: {logs[name].read_text()[-3000:]}\n{worker_logs}"
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        files.close()
    return base


@pytest.fixture(scope="module")
def harness(worlds):
    return {rank: json.loads((worlds / f"rank{rank}.json").read_text()) for rank in (0, 1)}


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_stage2_loss_curve_matches_native_ddp(worlds):
    base = worlds
    native, ds = _read_jsonl(base / "native" / "metrics.jsonl"), _read_jsonl(base / "ds2" /
                                                                             "metrics.jsonl")
    assert [m["step"] for m in ds] == list(range(10))
    for x, y in zip(native, ds, strict=True):
        assert not y["skipped"] and x["lr"] == y["lr"], (x, y)
        assert _close(x["loss"], y["loss"]) and _close(x["grad_norm"], y["grad_norm"]), (x, y)
        assert _close(x.get("val_loss", 1.0), y.get("val_loss", 1.0)), (x, y)
    assert ds[-1]["loss"] < ds[0]["loss"] - 1.0
    summary = json.loads((base / "ds2" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["layout"]["dp_shard"] == 1
    plan = json.loads((base / "ds2" / "plan.json").read_text())
    assert plan["schedule"] is None and plan["grad_accum"] == 2
    for rank in (0, 1):  # the same samples on the same dp rank at every step
        assert _read_jsonl(base / "native" / "audit" / f"rank{rank}.jsonl") == \
            _read_jsonl(base / "ds2" / "audit" / f"rank{rank}.jsonl")


@pytest.mark.e2e
@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", ["stage3", "offload"])
def test_stage3_and_offload_match_native_ddp(worlds, harness, case):
    native = _read_jsonl(worlds / "native" / "metrics.jsonl")
    for rank in (0, 1):
        res = harness[rank][case]
        for x, y in zip(native, res["steps"][:10], strict=True):
            assert not y["skipped"] and x["lr"] == y["lr"], (x, y)
            assert _close(x["loss"], y["loss"]) and _close(x["grad_norm"], y["grad_norm"]), (x, y)
        assert _close(native[-1]["val_loss"], res["val_loss"])
    info = harness[0][case]["info"]
    assert info["default_group_kept"] and info["ds_world"] == 2  # DeepSpeed adopted our group
    if case == "stage3":
        assert info["stage"] == 3 and info["partitioned"] == info["params"]
    else:
        assert info["stage"] == 2 and info["cpu_offload"]
        assert info["optimizer"] == "DeepSpeedCPUAdam"


@pytest.mark.e2e
@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", ["stage3", "offload"])
def test_nonfinite_step_is_skipped_and_stop_agreed_on_every_rank(harness, case):
    from phalanx.parallel.optim import lr_factor

    run = _run(*DS, "parallel.zero.stage=2")
    for rank in (0, 1):
        res = harness[rank][case]
        bad, after = res["steps"][NAN_STEP], res["steps"][STOP_STEP]
        # Rank 1 alone saw a NaN loss: both ranks report it and skip the update.
        assert bad["skipped"] and math.isnan(bad["loss"]) and not bad["stop"], bad
        assert res["unchanged_by_skip"], "a skipped step changed the parameters"
        # Training goes on (the optimizer state was not poisoned) and the LR schedule advanced.
        assert not after["skipped"] and math.isfinite(after["loss"]) and math.isfinite(
            after["grad_norm"])
        assert after["lr"] == pytest.approx(run.optim.lr * lr_factor(
            STOP_STEP, cfg=run.optim, total_steps=run.trainer.steps))
        assert after["stop"], "rank 0's stop request reaches every rank"
    assert harness[0][case]["checksum"] == harness[1][case]["checksum"]


def _rank_main() -> None:
    """One rank of the harness world (see the `harness` fixture)."""
    from datetime import timedelta

    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    from phalanx.config import RunConfig
    from phalanx.data import open_tokens
    from phalanx.orchestrator.corpus import corpus_from_dict
    from phalanx.parallel.deepspeed_trainer import DeepSpeedTrainer
    from phalanx.parallel.mesh import Layout

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), world, rank == 0,
                          timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    group = dist.distributed_c10d._get_default_group()
    spec = json.loads(Path(os.environ["DS_TEST_SPEC"]).read_text())
    tokens = open_tokens(corpus_from_dict(spec["corpus"]))
    out = {}
    for case in spec["cases"]:
        run = RunConfig.from_dict(case["run"])
        layout = Layout(dp_replicate=world, dp_shard=1, pp=1, tp=1, vpp=1)
        tr = DeepSpeedTrainer(run, rank=rank, layout=layout, tokens=tokens,
                              device=torch.device("cpu"))

        def master(tr: DeepSpeedTrainer) -> list[float]:  # full fp32 weights (a collective)
            return [float(safe_get_full_fp32_param(p).double().sum())
                    for p in tr.model.parameters()]

        steps, unchanged = [], None
        for step in range(STEPS):
            if step == NAN_STEP:
                before = master(tr)
                if rank == 1:
                    loss_sum = tr._loss_sum
                    tr._loss_sum = lambda x, y, f=loss_sum: f(x, y) * float("nan")
            r = tr.train_step(step, stop_requested=rank == 0 and step == STOP_STEP)
            if step == NAN_STEP:
                tr.__dict__.pop("_loss_sum", None)
                unchanged = master(tr) == before
            steps.append({"loss": r.loss, "grad_norm": r.grad_norm, "lr": r.lr,
                          "skipped": r.skipped, "stop": r.stop})
            if step == 9:
                val = tr.evaluate()  # after the 10 compared steps, like the native run
        params = list(tr.model.parameters())
        # Stages 1-2 keep whole parameters on every rank: compare the replicas' own copies.
        stage = tr.engine.zero_optimization_stage()
        checksum = master(tr) if stage == 3 else [float(p.detach().double().sum()) for p in params]
        out[case["name"]] = {
            "steps": steps, "val_loss": val, "unchanged_by_skip": unchanged, "checksum": checksum,
            "info": {"stage": stage,
                     "cpu_offload": bool(tr.engine.zero_cpu_offload()),
                     "optimizer": type(tr.optimizer).__name__,
                     "params": len(params),
                     # ZeRO-3 keeps 1/world of each parameter; the module's tensor is empty.
                     "partitioned": sum(1 for p in params if getattr(p, "ds_tensor", None) is not
                                        None and p.numel() == 0 and p.ds_tensor.numel() < p.ds_numel),
                     "default_group_kept": dist.distributed_c10d._get_default_group() is group,
                     "ds_world": deepspeed.comm.get_world_size()}}
        dist.barrier()
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()


if __name__ == "__main__":
    _rank_main()
    sys.stdout.flush()
    os._exit(0)  # see phalanx/launch/worker.py: gloo teardown may abort at finalization
