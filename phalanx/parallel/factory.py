"""Build the trainer a plan asks for (one place, so the worker, tests and benchmarks agree)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from phalanx.config import RunConfig
from phalanx.parallel.mesh import Layout


def build_trainer(run: RunConfig, *, rank: int, layout: Layout, schedule: dict[str, Any] | None,
                  tokens: np.ndarray, device: torch.device, state_follows: bool = False) -> Any:
    """DeepSpeed when its backend is chosen, DDP when the plan has no schedule (dp only),
    else the 3D-parallel pipeline trainer running the plan's schedule. `state_follows`: the
    caller overwrites every rank's state right after (a recovery), so DDP need not make the
    replicas' initial parameters agree."""
    if run.parallel.zero.backend == "deepspeed":
        from phalanx.parallel.deepspeed_trainer import DeepSpeedTrainer

        return DeepSpeedTrainer(run, rank=rank, layout=layout, tokens=tokens, device=device)
    if schedule is None:
        from phalanx.parallel.data_parallel import DataParallelTrainer

        return DataParallelTrainer(run, rank=rank, layout=layout, tokens=tokens, device=device,
                                   init_sync=not state_follows)
    from phalanx.parallel.pipeline.schedules import Schedule
    from phalanx.parallel.pipeline_trainer import PipelineTrainer

    return PipelineTrainer(run, rank=rank, layout=layout, tokens=tokens, device=device,
                           schedule=Schedule.from_dict(schedule))
