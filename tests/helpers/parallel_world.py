"""One rank of a numeric-parity world: runs every case of its world size, saves gradients.

Started as a plain process by tests/test_parallel_parity.py (RANK, WORLD_SIZE,
MASTER_PORT, CASES, OUT in the environment): one gloo world per world size
runs the whole matrix, so the suite pays the process start-up once, not per case.
"""

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from phalanx.config import RunConfig
from phalanx.data import open_tokens
from phalanx.orchestrator.corpus import corpus_from_dict
from phalanx.parallel.mesh import Layout
from phalanx.parallel.pipeline_trainer import PipelineTrainer


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
        res = trainer.train_step(0)
        grads, params = {}, {}
        for m in trainer.stages.values():
            for name, p in m.named_parameters():
                assert p.grad is not None, f"{case['name']} rank {rank}: no gradient for {name}"
                g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                w = p.full_tensor() if isinstance(p, DTensor) else p
                grads[name], params[name] = g.detach().clone(), w.detach().clone()
        torch.save({"loss": res.loss, "grad_norm": res.grad_norm, "grads": grads,
                    "params": params, "coords": layout.coords(rank),
                    "events": [e.__dict__ for e in trainer.last_events]},
                   out / f"{case['name']}.rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # see phalanx/launch/worker.py: gloo teardown may abort at finalization
