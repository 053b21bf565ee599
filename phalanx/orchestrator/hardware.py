"""From a cluster recipe (and, for this machine, a calibrated profile) to the cost model's inputs."""

from __future__ import annotations

import os

from phalanx.config import ClusterConfig, ConfigError, RunConfig
from phalanx.models.llama import LlamaConfig
from phalanx.orchestrator.cost import ComputeModel, FlopCompute, Hardware, Link, ProfileCompute


def _host_memory_bytes() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    return 0.0


def _link(cfg_alpha_us: float | None, cfg_gbps: float | None, measured: Link | None,
          what: str) -> Link:
    if cfg_alpha_us is not None and cfg_gbps is not None:
        return Link(alpha_s=cfg_alpha_us * 1e-6, bandwidth_Bps=cfg_gbps * 1e9)
    if measured is not None:
        return measured
    raise ConfigError(f"cluster.{what}: no alpha_us/bandwidth_gbps given and no calibrated "
                      "profile; run `phalanx calibrate` or set them in the cluster recipe.")


def hardware(cluster: ClusterConfig, *, profile: object | None = None) -> Hardware:
    measured = None
    over = 1.0
    if profile is not None:
        fit = profile.collectives.get("intra", {}).get("p2p")
        if fit is not None:
            measured = Link(alpha_s=fit.alpha_s, bandwidth_Bps=fit.beta_bytes_per_s)
        if profile.oversubscription:
            per_core = max(1.0, profile.oversubscription["ranks_per_core"])
            # The measured slowdown, per extra rank sharing a core, beyond the share itself.
            over = profile.oversubscription["compute_factor"] / per_core
    intra = _link(cluster.intra.alpha_us, cluster.intra.bandwidth_gbps, measured, "intra")
    inter = (_link(cluster.inter.alpha_us, cluster.inter.bandwidth_gbps, intra, "inter"))
    if cluster.memory_per_device_gb is not None:
        mem = cluster.memory_per_device_gb * 1e9
    else:
        mem = _host_memory_bytes() / cluster.devices_per_node
    cores = 0
    if cluster.device == "cpu":
        cores = cluster.cores_per_node or len(os.sched_getaffinity(0))
    return Hardware(devices_per_node=cluster.devices_per_node, nodes=cluster.nodes,
                    memory_per_device=mem, intra=intra, inter=inter, cores_per_node=cores,
                    oversubscription=over)


def compute_model(run: RunConfig, config: LlamaConfig, *,
                  profile: object | None = None) -> tuple[ComputeModel, bool]:
    """(compute model, whether its TP block times already include TP's collectives)."""
    c = run.cluster
    if c.peak_tflops is not None:
        return FlopCompute(config=config, seq_len=run.trainer.seq_len,
                           peak_flops=c.peak_tflops * 1e12, mfu=c.mfu), False
    if profile is None:
        raise ConfigError(f"cluster={c.name} has no peak_tflops and this model has no calibrated "
                          "profile on this machine: run `phalanx calibrate` with the same model "
                          "and trainer.seq_len first.")
    return ProfileCompute(profile), True
