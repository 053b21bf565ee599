"""The recipe schema: one typed tree that Hydra composes into and every process reads.

Hydra checks key names and types while it composes (the schema is registered in
its ConfigStore, so `trainer.stpes=3` or `trainer.steps=abc` fail there, naming
the key). `validate` then checks what types cannot express -- dims that must
divide, a layout that needs the world size it is given, features a later issue
brings -- and raises `ConfigError` with the key and the fix, before any worker
starts (DESIGN.md invariant 6).

Group-provided values are MISSING here so each number lives in exactly one
place: its recipe YAML under `phalanx/recipes/`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A recipe that cannot run. The message names the key and how to fix it."""


@dataclass
class ModelConfig:
    name: str = MISSING
    vocab_size: int = MISSING
    hidden_size: int = MISSING
    intermediate_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: int = MISSING
    max_position_embeddings: int = MISSING
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    init_std: float = 0.02


@dataclass
class ZeroConfig:
    stage: int = 0
    backend: str = "torch"
    offload: bool = False
    deepspeed_config: str | None = None


@dataclass
class ParallelConfig:
    # `dp` is shorthand for dp_replicate when dp_shard is 1; None fills the world.
    dp: int | None = None
    dp_replicate: int | None = None
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    micro_batch_size: int = MISSING
    schedule: str = "1f1b"
    recompute: str = "none"
    sp: bool = False
    zero: ZeroConfig = field(default_factory=ZeroConfig)


@dataclass
class TrainerConfig:
    global_batch: int = MISSING
    seq_len: int = MISSING
    steps: int = MISSING
    eval_every: int = MISSING
    eval_batches: int = MISSING
    grad_clip: float = 1.0
    seed: int = 1234
    audit_samples: bool = False


@dataclass
class OptimConfig:
    name: str = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = MISSING
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1


@dataclass
class DataConfig:
    source: str = MISSING
    path: str | None = None
    token_dtype: str | None = None
    val_fraction: float = 0.05
    # None: $PHALANX_CACHE or ~/.cache/phalanx
    cache_dir: str | None = None
    synthetic_tokens: int = 1_000_000
    synthetic_seed: int = 0


@dataclass
class PrecisionConfig:
    param: str = MISSING
    compute: str = MISSING
    reduce: str = MISSING


@dataclass
class LoggingConfig:
    wandb: bool = MISSING
    wandb_project: str = "phalanx"
    wandb_mode: str = "offline"
    # auto: a live rich progress bar on a terminal, a plain line every few seconds otherwise
    console: str = MISSING
    level: str = "INFO"


@dataclass
class LinkConfig:
    # None: measured by `phalanx calibrate` (this machine) -- presets cite their figures.
    alpha_us: float | None = None  # latency per message
    bandwidth_gbps: float | None = None  # GB/s per device, one direction


@dataclass
class ClusterConfig:
    name: str = MISSING
    nodes: int = 1
    devices_per_node: int = MISSING
    # None: the node's cores divided among its workers (at least 1)
    threads_per_worker: int | None = None
    device: str = "cpu"  # cpu | cuda
    # CPU nodes: ranks beyond this many share cores (None: this machine's usable cores)
    cores_per_node: int | None = None
    # Per device, for the compute dtype; None: calibrated on this machine
    peak_tflops: float | None = None
    # Memory a rank may use, GB; None: this machine's RAM divided among its workers
    memory_per_device_gb: float | None = None
    # Fraction of peak that uncalibrated (FLOP-based) predictions assume
    mfu: float = 0.4
    intra: LinkConfig = field(default_factory=LinkConfig)
    inter: LinkConfig = field(default_factory=LinkConfig)


# Fault injection (FaultConfig.inject, .random): what happens, and where in the step.
INJECT_KINDS = ("kill", "stop", "exit", "slow", "hang", "corrupt_checkpoint")
INJECT_POINTS = ("step", "allreduce", "recv", "optimizer", "recovery")
# The kinds that take a worker down (what fault.random draws from, what max_failures counts).
FAILURE_KINDS = ("kill", "stop", "exit", "hang")


@dataclass
class RandomFaultConfig:
    # Random failures for soak tests: mtbf_steps > 0 draws failure steps from a Poisson
    # process over training steps (exponential gaps with this mean, rounded up to whole
    # steps), each on a uniformly drawn rank with a kind drawn from `kinds` at a point drawn
    # from `at` (both as in fault.inject). Deterministic given `seed`; never more than
    # fault.max_failures minus the failures fault.inject already declares. The controller
    # draws the schedule at start-up (event `fault_schedule`) and adds it to fault.inject;
    # each one that fires is a `fault_injected` event with random=true. 0: off.
    mtbf_steps: float = 0.0
    kinds: list[str] = field(default_factory=lambda: ["kill"])
    at: list[str] = field(default_factory=lambda: ["step"])
    seed: int = 0


@dataclass
class FaultConfig:
    heartbeat_s: float = 1.0
    heartbeat_timeout_s: float = 30.0
    startup_timeout_s: float = 180.0
    collective_timeout_s: float = 300.0
    shutdown_grace_s: float = 30.0
    # What a lost worker costs: auto = the cheapest exact source (a surviving data-parallel
    # replica, else the newest checkpoint: peer memory or disk, everyone rolling back);
    # replica / checkpoint force one; checkfree = a replica where one lives, else an
    # intermediate pipeline stage rebuilt from its neighbours (CheckFree, not exact), else the
    # checkpoint; checkfree_plus = checkfree, and the end stages too: half the micro-batches
    # train with the first two and last two stages swapped, stages 1 and S-2 mirror the
    # embedding and head, and a lost end stage is copied from its swap partner (pp >= 4);
    # none = the run fails (the behaviour before recovery).
    policy: str = "auto"
    # What a stage rebuilt by checkfree / checkfree_plus starts from: its neighbours (the
    # paper's algorithm) or fresh random weights (the baseline it is measured against).
    checkfree_init: str = "neighbours"
    # Failures a run survives before it gives up (each one is a new generation).
    max_failures: int = 3
    # Fault injection: [{rank: 1, step: 20, kind: kill}, ...]; kind in kill (SIGKILL),
    # stop (SIGSTOP: frozen), exit (exit code 1), slow (sleep slow_s each step from then on),
    # hang (alive and beating, but stuck for ever: a deadlock), corrupt_checkpoint (flip
    # bytes in a shard file of the newest complete disk checkpoint, once this rank's pending
    # writes are durable; training goes on -- a later recovery must skip that checkpoint).
    # Optional `at`, where in step S (or later) the fault fires: step (default: before the
    # step), allreduce (a data-parallel gradient reduction -- DDP's bucket all-reduce, ZeRO's
    # all-reduce / reduce-scatter -- has just been issued: peers are inside it), recv (a
    # pipeline receive is pending), optimizer (after the commit, once this rank's optimizer
    # has updated its parameters or ZeRO shard, before ZeRO's all-gather), recovery (while
    # this rank enters a recovery generation -- groups rebuilt, state being transferred --
    # the first one at or after step S: a failure during recovery). slow and
    # corrupt_checkpoint fire at `step` only. Optional `delay_s` (default 0): fire that many
    # seconds later from a timer thread while the rank goes on.
    # An injection fires once per run: a replacement worker skips the ones its
    # predecessors fired (store key fault/fired/...) and fires the rest of its rank's.
    inject: list[Any] = field(default_factory=list)
    slow_s: float = 1.0
    # Random failures drawn from a seeded exponential distribution (see RandomFaultConfig).
    random: RandomFaultConfig = field(default_factory=RandomFaultConfig)
    # Stragglers. Each rank sends its busy time per step (the step's wall time minus the time
    # it spent blocked on peers: collectives, pipeline transfers, the commit) with its vote;
    # with synchronous collectives the wall time alone is the slowest rank's on every rank.
    # A rank whose busy time exceeds straggler_factor x the median of its peers' (the other
    # ranks holding the same pipeline stage; all other ranks in a pure pipeline) for
    # straggler_steps consecutive steps is a straggler: event `straggler` (rank, ratio).
    # straggler_policy: report (the event only), evict (also fence and replace it like a
    # failed worker; counts against max_failures, and costs a rollback where no replica
    # lives), off.
    straggler_policy: str = "report"
    straggler_factor: float = 2.0
    straggler_steps: int = 5
    # No committed step for this long while every worker still sends heartbeats is a hang:
    # every worker's Python stacks are collected (faulthandler, SIGUSR1) and the rank that
    # is not where the others wait is named, fenced and replaced.
    hang_timeout_s: float = 600.0
    # Replace a lost worker (a spare or a new process). false: shrink instead -- the
    # data-parallel replicas that lost a rank leave whole and the others go on with the same
    # pp x tp x dp_shard layout (the global batch and gradient scale are kept by more
    # accumulation), and grow back to the full world after grow_after_steps committed steps
    # (0: stay small).
    replace: bool = True
    grow_after_steps: int = 0
    # Warm spare workers kept started (Python + torch imported) to replace a lost worker in
    # a store round trip instead of a process start; refilled after each use.
    spares: int = 0


@dataclass
class CheckpointConfig:
    # Snapshot into host memory every N steps (0: never); the copy overlaps the next
    # forward/backward and the next optimizer step waits for it.
    memory_every: int = 0
    # Persist every N steps (0: never) in a background process; a multiple of memory_every
    # when that is set (disk writes the latest memory snapshot).
    disk_every: int = 0
    # Every N steps (0: never) also send the snapshot to a buddy worker's memory (on another
    # node, else another pipeline stage); a multiple of memory_every when that is set.
    peer_every: int = 0
    # Disk retention: the newest keep_last, plus every step that is a multiple of keep_every.
    keep_last: int = 2
    keep_every: int = 0
    # Where checkpoints go; None: RUN_DIR/checkpoints.
    dir: str | None = None
    # Start from a checkpoint: "latest" (newest verified under dir) or a checkpoint path.
    resume: str | None = None
    # Seconds a background write may take before it is abandoned (left invisible).
    persist_timeout_s: float = 600.0


@dataclass
class LowCommConfig:
    # Low-communication training across slow links (phalanx/parallel/lowcomm). none: every
    # step's gradients are all-reduced over data parallelism. diloco | streaming_diloco |
    # noloco: replicas (parallel.dp_replicate) train alone with the inner optimizer (optim.*)
    # and meet only at outer steps; the per-step all-reduce across replicas is off.
    method: str = "none"
    sync_every: int = 100  # H: inner steps per outer step (per fragment, for streaming)
    outer_lr: float = 0.7  # DiLoCo's outer SGD lr; NoLoCo's beta
    outer_momentum: float = 0.9  # DiLoCo's outer momentum; NoLoCo's alpha (its recipe: 0.5)
    nesterov: bool = True  # DiLoCo / streaming: Nesterov (true) or heavy-ball momentum
    # Streaming DiLoCo: P fragments (blocks dealt out strided), each synced once every
    # sync_every steps, staggered; its all-reduce overlaps overlap_steps (tau) inner steps,
    # then local = mixing * local + (1 - mixing) * global (alpha).
    fragments: int = 1
    overlap_steps: int = 0
    mixing: float = 0.0
    # Pseudo-gradients on the wire: none (fp32) | int8 | fp8 | fp4, per-block scales,
    # fp32 accumulation (phalanx/kernels/quant.py).
    quantize: str = "none"
    quant_block: int = 128
    # NoLoCo: each outer step averages within random groups of group_size replicas (drawn
    # from trainer.seed and the outer step), pulled together by local_averaging (gamma).
    group_size: int = 2
    local_averaging: float = 0.7
    # NoLoCo with pipeline parallelism: every step, each micro-batch leaves each stage for the
    # next stage of a random replica (a permutation drawn from trainer.seed, step, micro-batch
    # and stage; phalanx/parallel/lowcomm/routing.py). Activations then cross replicas.
    route_microbatches: bool = False


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lowcomm: LowCommConfig = field(default_factory=LowCommConfig)

    @property
    def world_size(self) -> int:
        return self.cluster.nodes * self.cluster.devices_per_node

    @property
    def dp_size(self) -> int:
        p = self.parallel
        assert p.dp_replicate is not None, "validate() fills dp_replicate"
        return p.dp_replicate * p.dp_shard

    @property
    def grad_accum(self) -> int:
        return self.trainer.global_batch // (self.dp_size * self.parallel.micro_batch_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        cfg = OmegaConf.merge(OmegaConf.structured(cls), d)
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]


SCHEMA_NAME = "phalanx_schema"


def register_schema() -> None:
    """Make the schema the first entry of config.yaml's defaults list."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)


_DTYPES = ("fp32", "bf16")
# Pipeline schedules by name (phalanx.parallel.pipeline.schedules.build_schedule).
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1")
VIRTUAL_SCHEDULES = ("interleaved_1f1b",)
_DATA_SOURCES = ("stdlib", "synthetic", "files")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _positive(key: str, value: float) -> None:
    _require(value > 0, f"{key}={value} must be positive.")


def _validate_lowcomm(run: RunConfig) -> None:
    lc, p = run.lowcomm, run.parallel
    methods = ("none", "diloco", "streaming_diloco", "noloco")
    _require(lc.method in methods,
             f"lowcomm.method={lc.method!r}: choose one of {', '.join(methods)}.")
    _require(not lc.route_microbatches or lc.method == "noloco",
             f"lowcomm.route_microbatches=true with lowcomm.method={lc.method}: random routing "
             "of micro-batches between pipeline replicas is NoLoCo's; set lowcomm.method=noloco "
             "or lowcomm.route_microbatches=false.")
    if lc.method == "none":
        return
    _require(lc.sync_every >= 1, f"lowcomm.sync_every={lc.sync_every} must be >= 1.")
    _positive("lowcomm.outer_lr", lc.outer_lr)
    _require(0.0 <= lc.outer_momentum < 1.0,
             f"lowcomm.outer_momentum={lc.outer_momentum} must be in [0, 1).")
    _require(lc.quantize in ("none", "int8", "fp8", "fp4"),
             f"lowcomm.quantize={lc.quantize!r}: choose none, int8, fp8 or fp4.")
    _require(lc.quant_block >= 2 and lc.quant_block % 2 == 0,
             f"lowcomm.quant_block={lc.quant_block}: use an even block size >= 2.")
    _require(p.zero.stage == 0 and p.zero.backend == "torch",
             f"lowcomm.method={lc.method} with parallel.zero.stage={p.zero.stage} "
             f"(backend {p.zero.backend}): outer optimizers run on whole replicas, pipeline "
             "stages and tensor-parallel shards, not on ZeRO shards yet; set "
             "parallel.zero.stage=0.")
    if lc.method == "streaming_diloco":
        _require(1 <= lc.fragments <= run.model.num_hidden_layers,
                 f"lowcomm.fragments={lc.fragments} must be in [1, model.num_hidden_layers="
                 f"{run.model.num_hidden_layers}] (fragments are sets of whole blocks).")
        _require(lc.sync_every % lc.fragments == 0,
                 f"lowcomm.sync_every={lc.sync_every} is not a multiple of lowcomm.fragments="
                 f"{lc.fragments}: fragments sync in turn every sync_every/fragments steps.")
        every = lc.sync_every // lc.fragments
        _require(0 <= lc.overlap_steps < every,
                 f"lowcomm.overlap_steps={lc.overlap_steps} must be in [0, sync_every/fragments"
                 f" = {every}): a fragment's sync must finish before the next one starts.")
        _require(0.0 <= lc.mixing <= 1.0, f"lowcomm.mixing={lc.mixing} must be in [0, 1].")
    if lc.method == "noloco":
        assert p.dp_replicate is not None
        _require(2 <= lc.group_size <= max(2, p.dp_replicate),
                 f"lowcomm.group_size={lc.group_size} must be in [2, parallel.dp_replicate="
                 f"{p.dp_replicate}]: each replica averages with group_size - 1 others.")
        _require(p.dp_replicate >= 2, "lowcomm.method=noloco needs parallel.dp_replicate >= 2 "
                 "(replicas to average with); use lowcomm.method=diloco for one replica.")
        _require(0.0 <= lc.local_averaging <= 1.0,
                 f"lowcomm.local_averaging={lc.local_averaging} must be in [0, 1].")
        _require(not lc.route_microbatches or p.pp >= 2,
                 f"lowcomm.route_microbatches=true with parallel.pp={p.pp}: it routes "
                 "micro-batches between replicas of the next pipeline stage; set parallel.pp>=2 "
                 "or lowcomm.route_microbatches=false.")


def validate(cfg: DictConfig | RunConfig) -> RunConfig:
    """Check a composed recipe and return it as a typed `RunConfig` with derived keys filled."""
    if isinstance(cfg, DictConfig):
        missing = sorted(OmegaConf.missing_keys(cfg))
        _require(not missing, f"recipe keys without a value: {', '.join(missing)}. "
                 "Set them on the command line (key=value) or pick a recipe that sets them.")
        run: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    else:
        run = dataclasses.replace(cfg)
    m, p, t, o, d = run.model, run.parallel, run.trainer, run.optim, run.data

    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings"):
        _positive(f"model.{key}", getattr(m, key))
    _require(m.hidden_size % m.num_attention_heads == 0,
             f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
             f"{m.num_attention_heads}; pick a head count that divides it.")
    _require(m.num_attention_heads % m.num_key_value_heads == 0,
             f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
             f"model.num_key_value_heads={m.num_key_value_heads} (grouped-query attention "
             "shares each key/value head among a whole number of query heads).")
    _require((m.hidden_size // m.num_attention_heads) % 2 == 0,
             "model head_dim (hidden_size / num_attention_heads) must be even for rotary embeddings.")

    for key in ("global_batch", "seq_len", "steps", "eval_every", "eval_batches"):
        _positive(f"trainer.{key}", getattr(t, key))
    _require(t.seq_len <= m.max_position_embeddings,
             f"trainer.seq_len={t.seq_len} exceeds model.max_position_embeddings="
             f"{m.max_position_embeddings}; shorten the sequence or raise the model's limit.")

    ck = run.checkpoint
    for key in ("memory_every", "disk_every", "peer_every", "keep_every"):
        _require(getattr(ck, key) >= 0, f"checkpoint.{key}={getattr(ck, key)} must be >= 0 "
                 "(0 turns that level off).")
    _require(ck.keep_last >= 1, f"checkpoint.keep_last={ck.keep_last}: keep at least 1 "
             "checkpoint on disk, or turn disk checkpoints off with checkpoint.disk_every=0.")
    for key in ("disk_every", "peer_every"):
        every = getattr(ck, key)
        _require(not (ck.memory_every and every) or every % ck.memory_every == 0,
                 f"checkpoint.{key}={every} is not a multiple of checkpoint.memory_every="
                 f"{ck.memory_every}: that level sends a memory snapshot, so make it a multiple "
                 "(or set memory_every=0 to snapshot only for it).")
    _require(not (ck.peer_every and ck.disk_every and not ck.memory_every)
             or ck.disk_every % ck.peer_every == 0 or ck.peer_every % ck.disk_every == 0,
             "checkpoint.peer_every and checkpoint.disk_every without memory_every: one must "
             "divide the other (set checkpoint.memory_every to their common divisor).")
    _require(not ((ck.memory_every or ck.disk_every or ck.resume)
                  and run.parallel.zero.backend == "deepspeed"),
             "checkpoint.* with parallel.zero.backend=deepspeed: DeepSpeed keeps its own "
             "checkpoint format; use parallel.zero.backend=torch for phalanx checkpoints.")

    # Layout. ZeRO shards within dp_shard; dp_replicate holds full copies (HSDP).
    z = p.zero
    _require(z.stage in (0, 1, 2, 3), f"parallel.zero.stage={z.stage}: choose 0, 1, 2 or 3.")
    _require(z.backend in ("torch", "deepspeed"),
             f"parallel.zero.backend={z.backend!r}: choose torch or deepspeed.")
    if z.backend == "deepspeed":
        # DeepSpeed owns its process groups and checkpoint format: plain data parallelism only.
        _require(p.pp == 1 and p.tp == 1,
                 f"parallel.zero.backend=deepspeed with parallel.pp={p.pp}, parallel.tp={p.tp}: "
                 "pipeline/TP layouts use the torch backend (parallel.zero.backend=torch); "
                 "DeepSpeed runs plain data-parallel layouts and is non-elastic.")
        _require(p.dp_shard == 1,
                 f"parallel.dp_shard={p.dp_shard} with parallel.zero.backend=deepspeed: DeepSpeed "
                 "shards over all data-parallel ranks; set parallel.dp_shard=1 and size the group "
                 "with parallel.dp (or use parallel.zero.backend=torch for HSDP).")
        _require(z.stage > 0, "parallel.zero.backend=deepspeed with parallel.zero.stage=0 is plain "
                 "data parallelism: use parallel.zero.backend=torch (DDP), or set "
                 "parallel.zero.stage=1, 2 or 3.")
        _require(importlib.util.find_spec("deepspeed") is not None,
                 "parallel.zero.backend=deepspeed needs DeepSpeed: pip install 'phalanx[deepspeed]' "
                 "(or use parallel.zero.backend=torch).")
    _require(not z.offload or z.backend == "deepspeed",
             "parallel.zero.offload=true (optimizer state and step on the CPU, DeepSpeed's CPU "
             "Adam) needs parallel.zero.backend=deepspeed.")
    if z.deepspeed_config is not None:
        _require(z.backend == "deepspeed", "parallel.zero.deepspeed_config is read by the DeepSpeed "
                 "backend only: set parallel.zero.backend=deepspeed (or drop the file).")
        path = os.path.abspath(os.path.expanduser(z.deepspeed_config))
        _require(os.path.isfile(path), f"parallel.zero.deepspeed_config={z.deepspeed_config} does "
                 "not exist; point it at a DeepSpeed JSON config (or its zero_optimization block).")
        from phalanx.parallel.deepspeed_backend import load_user_zero_block

        try:
            load_user_zero_block(path, stage=z.stage, offload=z.offload)
        except ValueError as e:
            raise ConfigError(f"parallel.zero.deepspeed_config: {e}") from None
        z.deepspeed_config = path  # workers may start in another directory
    _require(p.dp_shard == 1 or z.stage > 0,
             f"parallel.dp_shard={p.dp_shard} shards model state with ZeRO: set "
             "parallel.zero.stage=1, 2 or 3 (or parallel.dp_shard=1 for plain replicas).")
    # The torch backend shards within dp_shard; DeepSpeed shards over the whole dp group.
    _require(z.stage == 0 or p.dp_shard > 1 or z.backend != "torch",
             f"parallel.zero.stage={z.stage} shards within parallel.dp_shard, which is 1: set "
             "parallel.dp_shard to the number of ranks to shard over.")
    _require(z.stage == 0 or p.tp == 1,
             f"parallel.zero.stage={z.stage} with parallel.tp={p.tp}: ZeRO over tensor-parallel "
             "shards is not available in this build yet; use parallel.tp=1 with ZeRO.")
    for key in ("tp", "pp", "vpp"):
        _positive(f"parallel.{key}", getattr(p, key))
    _require(not p.sp or p.tp > 1, "parallel.sp=true (sequence parallel) shards activations over "
             "the tensor-parallel group: it needs parallel.tp > 1.")
    _require(p.schedule in SCHEDULES,
             f"parallel.schedule={p.schedule!r}: choose one of {', '.join(SCHEDULES)}.")
    _require(p.vpp == 1 or p.schedule in VIRTUAL_SCHEDULES,
             f"parallel.vpp={p.vpp} needs an interleaved schedule: set "
             f"parallel.schedule={VIRTUAL_SCHEDULES[0]} (or parallel.vpp=1).")
    _require(not (p.sp and t.seq_len % p.tp),
             f"trainer.seq_len={t.seq_len} is not divisible by parallel.tp={p.tp}, which sequence "
             "parallelism (parallel.sp=true) splits it into.")
    _require(p.recompute in ("none", "selective", "full"),
             f"parallel.recompute={p.recompute!r}: choose none, selective or full.")
    _positive("cluster.nodes", run.cluster.nodes)
    _positive("cluster.devices_per_node", run.cluster.devices_per_node)
    world = run.world_size
    if p.dp is not None:
        _require(p.dp_replicate is None or p.dp_replicate == p.dp,
                 f"parallel.dp={p.dp} and parallel.dp_replicate={p.dp_replicate} disagree; "
                 "set only one of them.")
        p.dp_replicate = p.dp
    model_parallel = p.tp * p.pp * p.dp_shard
    if p.dp_replicate is None:
        _require(world % model_parallel == 0,
                 f"the world of {world} workers is not divisible by tp*pp*dp_shard={model_parallel}.")
        p.dp_replicate = world // model_parallel
    p.dp = p.dp_replicate if p.dp_shard == 1 else None
    _positive("parallel.dp_replicate", p.dp_replicate)
    _require(p.dp_replicate * model_parallel == world,
             f"the layout dp_replicate*dp_shard*tp*pp = {p.dp_replicate}*{p.dp_shard}*{p.tp}*{p.pp} "
             f"= {p.dp_replicate * model_parallel} workers, but {world} are launched "
             f"(--nproc-per-node {run.cluster.devices_per_node} x --nnodes {run.cluster.nodes}); "
             f"set --nproc-per-node {p.dp_replicate * model_parallel} or change parallel.dp.")
    _positive("parallel.micro_batch_size", p.micro_batch_size)
    per_rank = p.micro_batch_size * run.dp_size
    _require(t.global_batch % per_rank == 0,
             f"trainer.global_batch={t.global_batch} is not divisible by parallel.micro_batch_size"
             f"={p.micro_batch_size} x data-parallel size {run.dp_size}; use a global batch that "
             f"is a multiple of {per_rank} (gradient accumulation covers the rest).")

    from phalanx.parallel.mesh import Layout

    try:
        Layout(dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, pp=p.pp, tp=p.tp,
               vpp=p.vpp).check_model(
            num_layers=m.num_hidden_layers, num_heads=m.num_attention_heads,
            num_kv_heads=m.num_key_value_heads, n_microbatches=run.grad_accum, schedule=p.schedule)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    _validate_lowcomm(run)
    _require(o.name == "adamw", f"optim.name={o.name!r}: only adamw is available.")
    _positive("optim.lr", o.lr)
    _require(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0.")
    _require(o.schedule in ("cosine", "constant"),
             f"optim.schedule={o.schedule!r}: choose cosine or constant.")
    _require(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1].")
    _require(t.grad_clip >= 0, f"trainer.grad_clip={t.grad_clip} must be >= 0 (0 disables).")

    _require(d.source in _DATA_SOURCES,
             f"data.source={d.source!r}: choose one of {', '.join(_DATA_SOURCES)}.")
    if d.source == "files":
        _require(bool(d.path), "data.source=files needs data.path=<text file, directory or .bin>.")
        _require(os.path.exists(os.path.expanduser(d.path or "")),
                 f"data.path={d.path} does not exist; point it at a text file, a directory of "
                 "text files, or a flat token file (.bin).")
    _require(0.0 < d.val_fraction < 0.5, f"data.val_fraction={d.val_fraction} must be in (0, 0.5).")
    _require(d.token_dtype in (None, "uint8", "uint16", "uint32"),
             f"data.token_dtype={d.token_dtype!r}: choose uint8, uint16 or uint32.")

    pr = run.precision
    for key in ("param", "compute", "reduce"):
        _require(getattr(pr, key) in _DTYPES,
                 f"precision.{key}={getattr(pr, key)!r}: choose one of {', '.join(_DTYPES)}.")
    _require(pr.reduce == "fp32" or z.backend == "deepspeed" or _has_cuda(),
             "precision.reduce=bf16 compresses gradients with torch's bf16 hook, which needs "
             "CUDA/NCCL; on CPU use precision.reduce=fp32 (or parallel.zero.backend=deepspeed).")
    _require(pr.param == "fp32", "precision.param=bf16 needs fp32 master weights, which are not "
             "available yet; use precision.param=fp32 with precision.compute=bf16.")
    _require(run.logging.console in ("auto", "rich", "plain", "none"),
             f"logging.console={run.logging.console!r}: choose auto, rich, plain or none.")
    _require(run.logging.wandb_mode in ("offline", "online", "disabled"),
             f"logging.wandb_mode={run.logging.wandb_mode!r}: choose offline, online or disabled.")
    f = run.fault
    for key in ("heartbeat_s", "heartbeat_timeout_s", "startup_timeout_s", "collective_timeout_s",
                "hang_timeout_s"):
        _positive(f"fault.{key}", getattr(f, key))
    _require(f.policy in ("auto", "replica", "checkpoint", "checkfree", "checkfree_plus", "none"),
             f"fault.policy={f.policy!r}: choose auto, replica, checkpoint, checkfree, "
             "checkfree_plus or none.")
    _require(f.checkfree_init in ("neighbours", "random"),
             f"fault.checkfree_init={f.checkfree_init!r}: choose neighbours or random.")
    if f.policy in ("checkfree", "checkfree_plus"):
        p = run.parallel
        _require(p.tp == 1 and p.zero.stage == 0 and p.vpp == 1,
                 f"fault.policy={f.policy} rebuilds whole stages held one per rank: it needs "
                 f"parallel.tp=1, parallel.zero.stage=0 and parallel.vpp=1 (got tp={p.tp}, "
                 f"zero.stage={p.zero.stage}, vpp={p.vpp}).")
    if f.policy == "checkfree_plus":
        p = run.parallel
        _require(p.pp >= 4, f"fault.policy=checkfree_plus swaps the first two and the last two "
                 f"pipeline stages for half the micro-batches, which needs parallel.pp >= 4 "
                 f"(got {p.pp}); use fault.policy=checkfree or checkpoint.")
    _require(f.max_failures >= 0, f"fault.max_failures={f.max_failures} must be >= 0.")
    _require(f.spares >= 0, f"fault.spares={f.spares} must be >= 0.")
    _require(f.grow_after_steps >= 0, f"fault.grow_after_steps={f.grow_after_steps} must be >= 0.")
    for i, inj in enumerate(f.inject):
        _require(isinstance(inj, dict) and {"rank", "step", "kind"} <= set(inj)
                 and set(inj) <= {"rank", "step", "kind", "at", "delay_s", "random"},
                 f"fault.inject[{i}]={inj!r}: each injection is {{rank: R, step: S, kind: K}} "
                 "with optional at: POINT and delay_s: SECONDS.")
        _require(inj["kind"] in INJECT_KINDS,
                 f"fault.inject[{i}].kind={inj['kind']!r}: choose {', '.join(INJECT_KINDS)}.")
        at = inj.get("at", "step")
        _require(at in INJECT_POINTS,
                 f"fault.inject[{i}].at={at!r}: choose {', '.join(INJECT_POINTS)}.")
        _require(at == "step" or inj["kind"] in FAILURE_KINDS,
                 f"fault.inject[{i}]: kind {inj['kind']} fires before a step only; drop "
                 f"at={at} (or use kind kill, stop, exit or hang there).")
        _require(float(inj.get("delay_s", 0)) >= 0,
                 f"fault.inject[{i}].delay_s={inj.get('delay_s')} must be >= 0.")
        _require(not float(inj.get("delay_s", 0)) or inj["kind"] in ("kill", "stop", "exit"),
                 f"fault.inject[{i}]: delay_s applies to kill, stop and exit (a signal from a "
                 f"timer thread), not to {inj['kind']}.")
        _require(0 <= int(inj["rank"]) < run.world_size,
                 f"fault.inject[{i}].rank={inj['rank']} is not a rank of this "
                 f"{run.world_size}-worker run.")
        _require(int(inj["step"]) >= 0, f"fault.inject[{i}].step={inj['step']} must be >= 0.")
    rf = f.random
    _require(rf.mtbf_steps >= 0, f"fault.random.mtbf_steps={rf.mtbf_steps} must be >= 0 "
             "(0: no random failures).")
    if rf.mtbf_steps:
        _require(bool(rf.kinds) and all(k in FAILURE_KINDS for k in rf.kinds),
                 f"fault.random.kinds={list(rf.kinds)}: choose from {', '.join(FAILURE_KINDS)}.")
        _require(bool(rf.at) and all(a in INJECT_POINTS for a in rf.at),
                 f"fault.random.at={list(rf.at)}: choose from {', '.join(INJECT_POINTS)}.")
    _require(f.straggler_policy in ("off", "report", "evict"),
             f"fault.straggler_policy={f.straggler_policy!r}: choose off, report or evict.")
    _require(f.straggler_factor > 1.0,
             f"fault.straggler_factor={f.straggler_factor} must exceed 1 (busy time relative "
             "to the median of the rank's peers).")
    _require(f.straggler_steps >= 1, f"fault.straggler_steps={f.straggler_steps} must be >= 1.")
    _require(f.heartbeat_timeout_s > 2 * f.heartbeat_s,
             f"fault.heartbeat_timeout_s={f.heartbeat_timeout_s} must exceed twice "
             f"fault.heartbeat_s={f.heartbeat_s}, or a healthy worker is declared dead.")
    return run
