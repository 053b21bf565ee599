"""`phalanx bench memory`: ZeRO's model-state bytes and peak RSS per rank, beside the formulas,
and the throughput of ZeRO-1/2 against torch DDP on pure data parallelism.

Model-state bytes are counted from the live tensors (parameters, gradients,
optimizer states and ZeRO's flat buffers, over unique storages) after a full
training step, independently of the formula code. Formulas for fp32 training
with Adam and no master copy (Rajbhandari et al. 2020 assume bf16 + an fp32
master, 16Ψ / 4Ψ+12Ψ/N / 2Ψ+14Ψ/N / 16Ψ/N; on CPU in fp32 it is):
  stage 0: 16Ψ   stage 1: 8Ψ + 8Ψ/N   stage 2: 4Ψ + 12Ψ/N   stage 3: 16Ψ/N
Peak RSS is the process's VmHWM, reset before each variant (clear_refs), so it
includes the interpreter and torch (reported separately as `baseline_mb`).
Stage 0 is torch DDP (what `phalanx run` uses without ZeRO).
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from phalanx.bench import result_doc
from phalanx.launch.world import pin, run_world, usable_cores

MB = 1 << 20
MODELS = {
    "tiny": ["model=tiny"],  # tests
    # ~10M: recipes/model/small.yaml
    "small": ["model=small"],
    # ~92M parameters with the byte vocabulary.
    "m100": ["model=small", "model.name=m100", "model.hidden_size=768",
             "model.intermediate_size=2304", "model.num_hidden_layers=12",
             "model.num_attention_heads=12", "model.num_key_value_heads=12"],
}


def formula_bytes(stage: int, numel: int, n: int) -> float:
    psi = numel
    return {0: 16 * psi, 1: 8 * psi + 8 * psi / n, 2: 4 * psi + 12 * psi / n,
            3: 16 * psi / n}[stage]


def model_state_bytes(trainer: Any) -> int:
    """Resident parameter, gradient and optimizer-state bytes of a trainer, over unique storages."""
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}

    def add(t: torch.Tensor | None) -> None:
        if t is None:
            return
        t = t._local_tensor if isinstance(t, DTensor) else t
        st = t.untyped_storage()
        if st.nbytes():
            seen[st.data_ptr()] = st.nbytes()

    modules = list(getattr(trainer, "stages", {}).values()) or [trainer.model]
    for m in modules:
        for p in m.parameters():
            add(p)
            add(p.grad)
    for z in getattr(trainer, "zero", {}).values():
        for g, _ in z.groups:
            for t in (g.shard, g.shard.grad, g.full, g.flat_grad):
                add(t)
    for state in trainer.optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.numel() > 1:
                add(v)
    return sum(seen.values())


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    # Linux: writing 5 resets VmHWM to the current RSS, so each variant gets its own peak.
    Path("/proc/self/clear_refs").write_text("5")


def _overrides(model: str, zero: int, world: int, *, seq_len: int, mbs: int,
               global_batch: int) -> list[str]:
    layout = (["parallel.dp_shard=" + str(world), f"parallel.zero.stage={zero}"] if zero
              else [])
    return [*MODELS[model], "data=synthetic", "data.synthetic_tokens=400000",
            f"trainer.seq_len={seq_len}", f"parallel.micro_batch_size={mbs}",
            f"trainer.global_batch={global_batch}", "trainer.steps=100", "trainer.eval_every=100",
            "trainer.eval_batches=1", *layout, "--nproc-per-node", str(world)]


def _variant(model: str, zero: int, world: int, **shape: int) -> dict[str, Any]:
    from phalanx.config import validate
    from phalanx.launch.cli import compose_recipe
    from phalanx.orchestrator.corpus import corpus_to_dict, prepare_corpus

    run = validate(compose_recipe(_overrides(model, zero, world, **shape)))
    return {"model": model, "zero": zero, "run": run.to_dict(),
            "corpus": corpus_to_dict(prepare_corpus(run))}


def _build(v: dict[str, Any], rank: int) -> Any:
    from phalanx.config import RunConfig
    from phalanx.data import open_tokens
    from phalanx.orchestrator.corpus import corpus_from_dict
    from phalanx.parallel.data_parallel import DataParallelTrainer
    from phalanx.parallel.mesh import Layout
    from phalanx.parallel.pipeline_trainer import PipelineTrainer

    run = RunConfig.from_dict(v["run"])
    p = run.parallel
    layout = Layout(dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, pp=p.pp, tp=p.tp, vpp=p.vpp)
    tokens = open_tokens(corpus_from_dict(v["corpus"]))
    cls = PipelineTrainer if v["zero"] else DataParallelTrainer
    return cls(run, rank=rank, layout=layout, tokens=tokens, device=torch.device("cpu"))


def _memory_worker(spec: dict[str, Any], rank: int) -> list[dict[str, Any]]:
    out = []
    for v in spec["variants"]:
        gc.collect()
        _reset_peak()
        baseline = _rss("VmRSS")
        trainer = _build(v, rank)
        for step in range(2):
            trainer.train_step(step)
        numel = sum(p.numel() for p in _full_model_params(v))
        state = model_state_bytes(trainer)
        par = v["run"]["parallel"]
        n = par["dp_replicate"] * par["dp_shard"]
        out.append({"kind": "memory", "model": v["model"], "zero": v["zero"], "dp": n,
                    "rank": rank, "numel": numel, "state_bytes": state,
                    "formula_bytes": formula_bytes(v["zero"], numel, n),
                    "peak_mb": _rss("VmHWM") / MB, "baseline_mb": baseline / MB})
        del trainer
        torch.distributed.barrier()
    return out


def _full_model_params(v: dict[str, Any]) -> list[torch.Tensor]:
    from phalanx.config import RunConfig
    from phalanx.models import LlamaForCausalLM
    from phalanx.parallel.data_parallel import model_config

    with torch.device("meta"):
        return list(LlamaForCausalLM(model_config(RunConfig.from_dict(v["run"]))).parameters())


def _speed_worker(spec: dict[str, Any], rank: int) -> list[dict[str, Any]]:
    trainers = {v["zero"]: _build(v, rank) for v in spec["variants"]}
    times: dict[int, list[float]] = {z: [] for z in trainers}
    step = 0
    for _ in range(spec["warmup"]):
        for tr in trainers.values():
            tr.train_step(step)
        step += 1
    # Round-robin, so drift on a shared machine hits every variant alike.
    for _ in range(spec["reps"]):
        for z, tr in trainers.items():
            t0 = time.perf_counter()
            tr.train_step(step)
            times[z].append(time.perf_counter() - t0)
        step += 1
    tokens = next(iter(trainers.values())).global_tokens
    return [{"kind": "speed", "zero": z, "rank": rank, "median_step_s": statistics.median(ts),
             "tokens_per_s": tokens / statistics.median(ts), "steps_s": ts}
            for z, ts in times.items()]


def _worker(spec_path: str) -> None:
    import os
    from datetime import timedelta

    import torch.distributed as dist

    spec = json.loads(Path(spec_path).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    pin(spec.get("cores"), rank)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    records = (_memory_worker if spec["mode"] == "memory" else _speed_worker)(spec, rank)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, records)
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps([r for rs in gathered for r in rs]))
    dist.barrier()
    dist.destroy_process_group()


def run(*, quick: bool) -> dict[str, Any]:
    models = ["small"] if quick else ["small", "m100"]
    runs: list[dict[str, Any]] = []
    cores = usable_cores()
    for model in models:
        for n in (2, 4):
            shape = dict(seq_len=64, mbs=1, global_batch=n)
            spec = {"mode": "memory", "variants": [_variant(model, z, n, **shape) for z in range(4)]}
            runs += run_world("phalanx.bench.memory", spec, world=n, timeout=1800,
                              label=f"memory bench {model} dp={n}")
    shape = dict(seq_len=128, mbs=4, global_batch=16)
    spec = {"mode": "speed", "warmup": 2, "reps": 6 if quick else 15,
            "cores": cores if len(cores) >= 2 else None,
            "variants": [_variant("small", z, 2, **shape) for z in (0, 1, 2)]}
    runs += run_world("phalanx.bench.memory", spec, world=2, timeout=1800,
                      label="memory bench speed dp=2")
    return result_doc("memory", quick=quick, runs=runs, figures=figures_from(runs, models[-1]))


def figures_from(runs: list[dict[str, Any]], model: str) -> dict[str, float]:
    figs: dict[str, float] = {}
    mem = [r for r in runs if r["kind"] == "memory" and r["model"] == model and r["dp"] == 4]
    for z in range(4):
        rs = [r for r in mem if r["zero"] == z]
        figs[f"state_ratio_zero{z}"] = max(r["state_bytes"] / r["formula_bytes"] for r in rs)
        figs[f"peak_mb_zero{z}"] = statistics.median(r["peak_mb"] for r in rs)
    speed = [r for r in runs if r["kind"] == "speed"]

    def tps(z: int) -> float:
        return statistics.median(r["tokens_per_s"] for r in speed if r["zero"] == z)

    figs["speedup_zero1_vs_ddp"] = tps(1) / tps(0)
    figs["speedup_zero2_vs_ddp"] = tps(2) / tps(0)
    return figs


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit("usage: phalanx bench memory [--quick] [--out FILE]")
