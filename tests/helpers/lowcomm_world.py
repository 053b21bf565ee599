"""One rank of the low-communication test world: runs every case, saves what tests compare.

Started by tests/test_lowcomm.py through phalanx.launch.world.run_world (`--worker SPEC`,
torchrun's environment; SPEC's "dir" is where each rank saves its results, rank 0 writes
SPEC's "out"); each rank is one replica of a small Llama, fed its own token batches.
Every case starts from the same initial weights. Wire bytes are measured with the kernel's
count of bytes this process wrote (/proc/self/io wchar: gloo's TCP transport writes with
writev) around the training loop, where nothing else writes.
"""

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from phalanx.models import LlamaConfig, LlamaForCausalLM
from phalanx.parallel.lowcomm import DiLoCo, NoLoCo, StreamingDiLoCo, replica_link
from phalanx.parallel.mesh import Layout

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)


def wchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar"):
                return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    tok = torch.randint(0, CFG.vocab_size, (2, 17), generator=g)
    return tok[:, :-1], tok[:, 1:]


def loss_of(model: torch.nn.Module, step: int, rank: int) -> torch.Tensor:
    x, y = batch(step, rank)
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def fresh_model() -> LlamaForCausalLM:
    m = LlamaForCausalLM(CFG)
    m.init_weights(7)
    return m


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def run_outer(make_outer, *, inner: str, lr: float, steps: int, rank: int, link) -> dict:
    model = fresh_model()
    opt = (torch.optim.SGD(model.parameters(), lr=lr) if inner == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1))
    outer = make_outer(list(model.named_parameters()), link)
    link.total = type(link.total)()
    dist.barrier()
    w0 = wchar()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_of(model, step, rank).backward()
        opt.step()
        outer.after_inner_step(step, final=step + 1 == steps)
    wire = wchar() - w0
    out = {"params": params_of(model), "totals": link.totals(), "wchar": wire,
           "digest": outer.digest(), "numel": sum(p.numel() for p in model.parameters())}
    if hasattr(outer, "global_params"):
        out["global"] = [g.clone() for g in outer.global_params]
    if hasattr(outer, "members"):
        out["fragment_numel"] = [sum(model.get_parameter(outer.names[i]).numel() for i in idx)
                                 for idx in outer.members]
    if hasattr(outer, "last_group"):
        out["last_group"] = outer.last_group
    dist.barrier()
    return out


def run_ddp_sgd(*, lr: float, steps: int, rank: int) -> dict:
    model = fresh_model()
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_of(ddp, step, rank).backward()
        opt.step()
    return {"params": params_of(model)}


def main() -> None:
    spec = json.loads(Path(sys.argv[sys.argv.index("--worker") + 1]).read_text())
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), world, rank == 0,
                          timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    link = replica_link(Layout(dp_replicate=world), rank)
    L = CFG.num_hidden_layers
    res: dict = {}
    # 1. DiLoCo with inner SGD, H=1, outer lr 1, no momentum vs synchronous DP SGD (DDP).
    res["ddp_sgd"] = run_ddp_sgd(lr=0.5, steps=4, rank=rank)
    res["diloco_h1"] = run_outer(
        lambda named, lk: DiLoCo(named, link=lk, sync_every=1, outer_lr=1.0, outer_momentum=0.0),
        inner="sgd", lr=0.5, steps=4, rank=rank, link=link)
    # 2. Streaming DiLoCo with P=1, tau=0, alpha=0, unquantized vs DiLoCo (AdamW inner, H=3,
    #    7 steps: two full rounds and a final partial one).
    res["diloco_adamw"] = run_outer(
        lambda named, lk: DiLoCo(named, link=lk, sync_every=3),
        inner="adamw", lr=3e-3, steps=7, rank=rank, link=link)
    res["streaming_p1"] = run_outer(
        lambda named, lk: StreamingDiLoCo(named, link=lk, sync_every=3, fragments=1,
                                          num_layers=L),
        inner="adamw", lr=3e-3, steps=7, rank=rank, link=link)
    # 3. NoLoCo with the group = all replicas and gamma=0 vs DiLoCo with heavy-ball momentum.
    res["diloco_heavy_ball"] = run_outer(
        lambda named, lk: DiLoCo(named, link=lk, sync_every=2, outer_lr=0.7, outer_momentum=0.5,
                                 nesterov=False),
        inner="sgd", lr=0.2, steps=6, rank=rank, link=link)
    res["noloco_all"] = run_outer(
        lambda named, lk: NoLoCo(named, link=lk, sync_every=2, group_size=world, outer_lr=0.7,
                                 outer_momentum=0.5, local_averaging=0.0),
        inner="sgd", lr=0.2, steps=6, rank=rank, link=link)
    # 4. The real configurations, for bytes and agreement: streaming P=4 (tau=1, alpha=0.5,
    #    fp4 and int8), DiLoCo fp8, NoLoCo pairs.
    for fmt in ("fp4", "int8"):
        res[f"streaming_{fmt}"] = run_outer(
            lambda named, lk, fmt=fmt: StreamingDiLoCo(
                named, link=lk, sync_every=8, fragments=4, num_layers=L, overlap_steps=1,
                mixing=0.5, quantize=fmt, quant_block=64),
            inner="adamw", lr=3e-3, steps=16, rank=rank, link=link)
    res["streaming_none"] = run_outer(
        lambda named, lk: StreamingDiLoCo(named, link=lk, sync_every=8, fragments=4,
                                          num_layers=L, overlap_steps=1, mixing=0.5),
        inner="adamw", lr=3e-3, steps=16, rank=rank, link=link)
    res["diloco_h8"] = run_outer(
        lambda named, lk: DiLoCo(named, link=lk, sync_every=8),
        inner="adamw", lr=3e-3, steps=16, rank=rank, link=link)
    res["diloco_fp8"] = run_outer(
        lambda named, lk: DiLoCo(named, link=lk, sync_every=8, quantize="fp8", quant_block=64),
        inner="adamw", lr=3e-3, steps=16, rank=rank, link=link)
    res["noloco_pairs"] = run_outer(
        lambda named, lk: NoLoCo(named, link=lk, sync_every=8, group_size=2, seed=3),
        inner="adamw", lr=3e-3, steps=16, rank=rank, link=link)
    torch.save(res, Path(spec["dir"]) / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps({"ranks": world}))


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # see phalanx/launch/worker.py: gloo teardown may abort at finalization
