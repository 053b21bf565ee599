"""One rank of a numeric-parity world: runs every case of its world size, saves the results.

Started as a plain process by tests/test_parallel_parity.py (RANK, WORLD_SIZE,
MASTER_PORT, CASES, OUT in the environment): one gloo world per world size
runs the whole matrix, so the suite pays the process start-up once, not per case.
"""

import json
import math
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from phalanx.bench.memory import model_state_bytes
from phalanx.config import RunConfig
from phalanx.data import open_tokens
from phalanx.orchestrator.corpus import corpus_from_dict
from phalanx.parallel.mesh import Layout
from phalanx.parallel.pipeline_trainer import PipelineTrainer


def stage_numel(trainer: PipelineTrainer) -> int:
    if trainer.zero:
        return sum(math.prod(s) for z in trainer.zero.values() for g, _ in z.groups for s in g.shapes)
    return sum(p.numel() for m in trainer.stages.values() for p in m.parameters())


def main() -> None:
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), world, rank == 0,
                          timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    cases = json.loads(Path(os.environ["CASES"]).read_text())
    out = Path(os.environ["OUT"])
    for case in cases:
        run = RunConfig.from_dict(case["run"])
        layout = Layout.from_dict(case["layout"])
        tokens = open_tokens(corpus_from_dict(case["corpus"]))
        trainer = PipelineTrainer(run, rank=rank, layout=layout, tokens=tokens,
                                  device=torch.device("cpu"))
        losses = [trainer.train_step(step).loss for step in range(case["steps"])]
        res = trainer.last_result
        state = model_state_bytes(trainer)
        for z in trainer.zero.values():
            z.unshard()  # stage 3 holds shards only; gather to compare whole parameters
        grads, params = {}, {}
        for m in trainer.stages.values():
            for name, p in m.named_parameters():
                w = p.full_tensor() if isinstance(p, DTensor) else p
                params[name] = w.detach().clone()
                if not trainer.zero:
                    assert p.grad is not None, f"{case['name']} rank {rank}: no gradient for {name}"
                    g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                    grads[name] = g.detach().clone()
        torch.save({"losses": losses, "grad_norm": res.grad_norm, "grads": grads,
                    "params": params, "coords": layout.coords(rank), "state_bytes": state,
                    "numel": stage_numel(trainer),
                    "events": [e.__dict__ for e in trainer.last_events]},
                   out / f"{case['name']}.rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # see phalanx/launch/worker.py: gloo teardown may abort at finalization
