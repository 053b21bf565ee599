"""DeepSpeed as the ZeRO backend (`parallel.zero.backend=deepspeed`), with ZeRO-Offload.

For plain data-parallel layouts (pp=1, tp=1, dp_shard=1): DeepSpeed shards ZeRO
stage 1-3 state over the whole data-parallel group. DeepSpeed owns its process
groups and its checkpoint format, so this backend is non-elastic: a run that
loses a worker fails (and restarts from a checkpoint) instead of shrinking.

The DeepSpeed config is generated from the recipe (`deepspeed_config`), never
hand-written. A user's existing DeepSpeed JSON may supply the `zero_optimization`
tuning knobs (`parallel.zero.deepspeed_config=path`, read by `load_user_zero_block`):
keys phalanx can honour pass through, the others are rejected with the reason.

`DeepSpeedTrainer` has `DataParallelTrainer`'s interface and numerics: the same
model init, the same data split (`GlobalBatchSampler`), the same loss convention
(summed over tokens / global token count) and the same AdamW and LR schedule, so
its loss curve matches the native DDP path step for step (tests/test_deepspeed.py).

Gradient scale. DeepSpeed's `engine.backward(loss)` divides the loss by
gradient_accumulation_steps, and its ZeRO reduction averages over the dp ranks.
We call `engine.backward(loss_sum * dp / global_tokens, scale_wrt_gas=False)`:
no division by the accumulation steps, and the dp average cancels the factor dp,
so the reduced gradient is (sum over every token of the global batch) /
global_tokens -- exactly DDP's (DESIGN.md invariant 5). With dp a power of two
the factors are exact in floating point.

Precision. `precision.compute=bf16` maps to DeepSpeed's `torch_autocast`
section, not to its `bf16` section: `bf16` stores the model's parameters and
gradients in bf16 (fp32 only inside the optimizer), while phalanx's recipe
keeps fp32 parameters (`precision.param=fp32`) and autocasts the compute, which
is what `torch_autocast` does. `precision.reduce=bf16` reduces the gradients of
the linear layers in bf16 (DeepSpeed's autocast `comm_dtype`), like the DDP
path's bf16 compression hook.

Only this module's trainer imports torch and DeepSpeed (lazily): the controller
validates recipes with `load_user_zero_block` without paying for either.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from phalanx.config import RunConfig

if TYPE_CHECKING:
    import torch


log = logging.getLogger(__name__)

# DeepSpeed JIT-compiles these C++ ops on first use (cached in $TORCH_EXTENSIONS_DIR):
# the shared-memory collective op that `init_distributed` builds, and CPU Adam.
JIT_OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")
# One build per machine, not per checkout or run directory (set before deepspeed is imported).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(
    Path(os.environ.get("PHALANX_EXTENSIONS_CACHE", "~/.cache/phalanx")).expanduser()
    / "torch_extensions"))

_LINEAR = "torch.nn.modules.linear.Linear"

# --- the user's zero_optimization block ----------------------------------------------------

# Tuning knobs passed through as given (DeepSpeed checks their ranges): bucket sizes,
# overlap, stage-3 prefetch/persistence, and checkpoint-only flags that change no numbers.
_INT_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "sub_group_size",
             "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
             "stage3_model_persistence_threshold", "stage3_max_live_parameters",
             "stage3_max_reuse_distance", "stage3_module_granularity_threshold")
_BOOL_KEYS = ("overlap_comm", "contiguous_gradients", "reduce_scatter", "allgather_partitions",
              "round_robin_gradients", "use_multi_rank_bucket_allreduce", "ignore_unused_parameters",
              "memory_efficient_linear", "stage3_use_all_reduce_for_fetch_params",
              "stage3_allgather_sequential", "load_from_fp32_weights",
              "stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save")
# DeepSpeed's field names for keys it also accepts under their stage3_ alias.
_ALIASES = {"prefetch_bucket_size": "stage3_prefetch_bucket_size",
            "param_persistence_threshold": "stage3_param_persistence_threshold",
            "model_persistence_threshold": "stage3_model_persistence_threshold",
            "max_live_parameters": "stage3_max_live_parameters",
            "max_reuse_distance": "stage3_max_reuse_distance",
            "gather_16bit_weights_on_model_save": "stage3_gather_16bit_weights_on_model_save"}
# Features phalanx's DeepSpeed backend does not run; a key is fine at its "off" value.
_REJECT: dict[str, tuple[Any, str]] = {
    "zero_quantized_weights": (False, "ZeRO++ quantized weights (qwZ) are not supported"),
    "zero_quantized_nontrainable_weights": (False, "ZeRO++ quantized weights are not supported"),
    "zero_quantized_gradients": (False, "ZeRO++ quantized gradients (qgZ) are not supported"),
    "zero_hpz_partition_size": (1, "ZeRO++ hierarchical partitioning (hpZ) is not supported; "
                                "for a secondary partition use parallel.dp_replicate x "
                                "parallel.dp_shard with parallel.zero.backend=torch"),
    "mics_shard_size": (-1, "MiCS sharding is not supported; for sub-group sharding use "
                        "parallel.dp_shard with parallel.zero.backend=torch"),
    "mics_hierarchical_params_gather": (False, "MiCS is not supported"),
    "zenflow": (None, "ZenFlow is not supported"),
    "compute_grad_norm": (True, "phalanx clips with trainer.grad_clip and skips non-finite "
                          "steps by the global gradient norm, which needs it"),
    "legacy_stage1": (False, "the legacy stage-1 implementation is not supported"),
    "elastic_checkpoint": (False, "DeepSpeed's elastic checkpoints are not supported: this "
                           "backend is non-elastic"),
    "cpu_offload_param": (False, "parameter offload is not supported (parallel.zero.offload "
                          "offloads optimizer state only)"),
}
_OFFLOAD_KEYS = ("device", "pin_memory")


def _fail(path: str | os.PathLike, key: str, value: Any, why: str, fix: str) -> NoReturn:
    raise ValueError(f"{path}: zero_optimization.{key}={json.dumps(value)}: {why}; {fix}.")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def load_user_zero_block(path: str | os.PathLike, *, stage: int | None = None,
                         offload: bool | None = None) -> dict[str, Any]:
    """A user's DeepSpeed JSON (a whole config, or just its `zero_optimization` block) as the
    `zero_optimization` entries phalanx passes to DeepSpeed.

    Supported: `stage` (must equal `stage`, the recipe's parallel.zero.stage, when given),
    `offload_optimizer` with device cpu or none (must agree with `offload`, the recipe's
    parallel.zero.offload), and the bucket / overlap / stage-3 tuning knobs. Everything else
    -- NVMe or parameter offload, ZeRO++ (quantized weights/gradients, hpZ), MiCS, unknown
    keys -- raises ValueError naming the key and the fix. "auto" values (Hugging Face's
    convention) are dropped: DeepSpeed's default applies. The file's other sections are
    ignored: batch, optimizer, scheduler and precision come from the recipe.
    """
    try:
        data = json.loads(Path(path).read_text(), object_pairs_hook=_no_duplicates)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it as DeepSpeed JSON: {e}.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a DeepSpeed config is a JSON object, not {type(data).__name__}.")
    if "zero_optimization" in data:
        block = data["zero_optimization"]
        if not isinstance(block, dict):
            raise ValueError(f"{path}: zero_optimization must be a JSON object.")
        ignored = sorted(k for k in data if k != "zero_optimization")
        if ignored:
            log.info("%s: reading zero_optimization only; %s come from the recipe", path,
                     ", ".join(ignored))
    else:
        block = data  # the file is the block itself
    out: dict[str, Any] = {}
    for key, value in block.items():
        name = _ALIASES.get(key, key)
        if value == "auto":
            continue
        if key == "stage":
            if isinstance(value, bool) or not isinstance(value, int) or value not in (0, 1, 2, 3):
                _fail(path, key, value, "ZeRO stages are 0, 1, 2 and 3", "fix the file")
            if stage is not None and value != stage:
                _fail(path, key, value, f"the recipe has parallel.zero.stage={stage}",
                      f"set parallel.zero.stage={value} (or stage {stage} in the file) so both agree")
            out["stage"] = value
        elif key == "offload_optimizer":
            if value is None:
                continue
            if not isinstance(value, dict):
                _fail(path, key, value, "it must be a JSON object", 'use {"device": "cpu"}')
            for sub, v in value.items():
                if sub == "nvme_path" and v is None:
                    continue
                if sub not in _OFFLOAD_KEYS:
                    why = ("NVMe offload (ZeRO-Infinity) is not supported" if "nvme" in sub
                           or sub in ("buffer_count", "pipeline_read", "pipeline_write") else
                           f"it is not supported (supported: {', '.join(_OFFLOAD_KEYS)})")
                    _fail(path, f"{key}.{sub}", v, why, f"remove {key}.{sub}")
            device = value.get("device", "none")
            if device not in ("cpu", "none"):
                _fail(path, f"{key}.device", device,
                      "only CPU optimizer offload (ZeRO-Offload) is supported, not NVMe",
                      'use "device": "cpu" or "none"')
            if offload is not None and (device == "cpu") != offload:
                _fail(path, f"{key}.device", device,
                      f"the recipe has parallel.zero.offload={str(offload).lower()}",
                      f"set parallel.zero.offload={str(device == 'cpu').lower()} so both agree")
            out[key] = dict(value)
        elif key == "cpu_offload":  # DeepSpeed's deprecated spelling of offload_optimizer cpu
            if not isinstance(value, bool):
                _fail(path, key, value, "it must be true or false", "fix the file")
            if offload is not None and value != offload:
                _fail(path, key, value,
                      f"the recipe has parallel.zero.offload={str(offload).lower()}",
                      f"set parallel.zero.offload={str(value).lower()} so both agree")
            out["offload_optimizer"] = {"device": "cpu" if value else "none"}
        elif key == "offload_param":
            device = value.get("device", "none") if isinstance(value, dict) else value
            if device not in (None, "none"):
                _fail(path, key, value,
                      "parameter offload (to CPU or NVMe) is not supported; phalanx offloads "
                      "optimizer state only (parallel.zero.offload=true)",
                      "remove offload_param (or set its device to none)")
        elif key in _REJECT:
            off, why = _REJECT[key]
            if value != off:
                _fail(path, key, value, why, f"remove {key} (or set it to {json.dumps(off)})")
        elif name in _INT_KEYS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
                    or value < 0:
                _fail(path, key, value, "it must be a non-negative whole number", "fix the file")
            out[name] = int(value)
        elif name in _BOOL_KEYS:
            if not isinstance(value, bool):
                _fail(path, key, value, "it must be true or false", "fix the file")
            out[name] = value
        else:
            supported = ", ".join(("stage", "offload_optimizer", *_INT_KEYS, *_BOOL_KEYS))
            _fail(path, key, value, "phalanx's DeepSpeed backend does not support this key",
                  f"remove it (supported: {supported})")
    return out


# --- the generated config ------------------------------------------------------------------

def deepspeed_config(run: RunConfig, *, dp_size: int) -> dict[str, Any]:
    """The DeepSpeed config for a validated recipe, on a data-parallel group of `dp_size`.

    No `optimizer` or `scheduler` section: the trainer passes its client optimizer
    (torch AdamW from `build_adamw`, or DeepSpeed's CPU Adam under ZeRO-Offload, with
    the same hyper-parameters) and the recipe's LR schedule.
    """
    p, t, z, pr = run.parallel, run.trainer, run.parallel.zero, run.precision
    per_step = p.micro_batch_size * dp_size
    if t.global_batch % per_step:
        raise ValueError(f"trainer.global_batch={t.global_batch} is not divisible by "
                         f"parallel.micro_batch_size={p.micro_batch_size} x dp {dp_size}")
    zero: dict[str, Any] = {}
    if z.deepspeed_config:
        zero.update(load_user_zero_block(z.deepspeed_config, stage=z.stage, offload=z.offload))
    zero["stage"] = z.stage
    if z.offload:
        zero["offload_optimizer"] = {**zero.get("offload_optimizer", {}), "device": "cpu"}
    else:
        zero.pop("offload_optimizer", None)
    cfg: dict[str, Any] = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": p.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch // per_step,
        "gradient_clipping": float(t.grad_clip),
        "zero_optimization": zero,
        # phalanx logs its own metrics; DeepSpeed's periodic "step=..." lines are noise.
        "steps_per_print": None,
        "wall_clock_breakdown": False,
    }
    if pr.compute == "bf16":
        cfg["torch_autocast"] = {
            "enabled": True, "dtype": "bfloat16",
            # Parameters of these module classes reduce their gradients in bf16.
            "lower_precision_safe_modules": [_LINEAR] if pr.reduce == "bf16" else []}
    return cfg


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """build_adamw's split: matrices decay, norm gains do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# --- process setup -------------------------------------------------------------------------

def _select_accelerator(device_type: str) -> None:
    """DeepSpeed picks its accelerator once per process, on first use: make it ours."""
    want = "cpu" if device_type == "cpu" else "cuda"
    have = os.environ.setdefault("DS_ACCELERATOR", want)
    if have != want:
        raise RuntimeError(f"DS_ACCELERATOR={have}, but this worker trains on {device_type}: "
                           "unset DS_ACCELERATOR (phalanx sets it per worker).")
    if "deepspeed" in sys.modules:
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != want:
            raise RuntimeError(f"DeepSpeed already chose the {get_accelerator().device_name()} "
                               f"accelerator in this process; this worker trains on {want}.")


def _load_op(name: str) -> Any:
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(name)
    if builder is None:
        raise RuntimeError(f"DeepSpeed has no {name} for the {get_accelerator().device_name()} "
                           "accelerator")
    return builder.load(verbose=False)


def load_cpu_adam() -> None:
    """Build (first time, ~1-2 min) or load DeepSpeed's CPU Adam kernel, with a clear error."""
    try:
        _load_op("CPUAdamBuilder")
    except Exception as e:  # noqa: BLE001 - compiler, ninja, headers: all end the same way
        raise RuntimeError(
            "parallel.zero.offload=true needs DeepSpeed's CPU Adam kernel, which did not build "
            f"here ({type(e).__name__}: {str(e)[-500:]}). It is JIT-compiled into "
            "$TORCH_EXTENSIONS_DIR and needs a C++ compiler (g++) and ninja; install them, or "
            "set parallel.zero.offload=false.") from e


def prebuild_ops(names: tuple[str, ...] = JIT_OPS) -> dict[str, float]:
    """Build (or load from $TORCH_EXTENSIONS_DIR) DeepSpeed's JIT ops; seconds per op."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = {}
    for name in names:
        t0 = time.perf_counter()
        _load_op(name)
        out[name] = round(time.perf_counter() - t0, 2)
    return out


if __name__ == "__main__":
    # `python -m phalanx.parallel.deepspeed_backend prebuild`: compile DeepSpeed's JIT ops
    # into $TORCH_EXTENSIONS_DIR once (CI does, so tests do not pay for it).
    if sys.argv[1:] != ["prebuild"]:
        sys.exit("usage: python -m phalanx.parallel.deepspeed_backend prebuild")
    print(json.dumps({"torch_extensions_dir": os.environ.get("TORCH_EXTENSIONS_DIR"),
                      "seconds": prebuild_ops()}))
