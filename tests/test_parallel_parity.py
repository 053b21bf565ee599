"""One 3D-parallel training step equals the unsplit model's `loss.backward()` in one process.

Every case runs one optimizer step on real gloo worker processes (one world per
world size runs the whole matrix) and is compared, parameter by parameter, with
the whole model trained on the same global batch in this process: the loss, the
clipped gradients (clipping set low so it triggers) and the updated weights.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phalanx.config import validate
from phalanx.data import GlobalBatchSampler, TokenWindows, open_tokens, train_val_split
from phalanx.launch.cli import compose_recipe
from phalanx.models import LlamaForCausalLM
from phalanx.orchestrator.corpus import corpus_from_dict, corpus_to_dict, prepare_corpus
from phalanx.parallel.data_parallel import model_config
from phalanx.parallel.optim import build_adamw, build_scheduler

pytestmark = pytest.mark.e2e

MODEL = ["model.hidden_size=64", "model.intermediate_size=96", "model.num_hidden_layers=8",
         "model.num_attention_heads=4", "model.num_key_value_heads=2",
         "model.max_position_embeddings=64"]
BASE = ["data=synthetic", "data.synthetic_tokens=60000", "trainer.seq_len=16",
        "trainer.global_batch=8", "parallel.micro_batch_size=1", "trainer.grad_clip=0.05",
        "trainer.steps=10", "trainer.eval_every=10", "trainer.eval_batches=1", *MODEL]

# name: (world, overrides)
CASES = {
    "pp2_gpipe": (2, ["parallel.pp=2", "parallel.schedule=gpipe"]),
    "pp2_1f1b": (2, ["parallel.pp=2", "parallel.schedule=1f1b"]),
    "pp2_zb_h1": (2, ["parallel.pp=2", "parallel.schedule=zb_h1"]),
    "pp2_vpp2_interleaved": (2, ["parallel.pp=2", "parallel.vpp=2",
                                 "parallel.schedule=interleaved_1f1b"]),
    "tp2": (2, ["parallel.tp=2"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sp=true"]),
    "pp4_1f1b": (4, ["parallel.pp=4", "parallel.schedule=1f1b"]),
    "pp4_vpp2_interleaved": (4, ["parallel.pp=4", "parallel.vpp=2",
                                 "parallel.schedule=interleaved_1f1b"]),
    "dp2_pp2_1f1b": (4, ["parallel.pp=2", "parallel.dp=2", "parallel.schedule=1f1b"]),
    "dp2_tp2": (4, ["parallel.tp=2", "parallel.dp=2"]),
    "pp2_tp2_sp_interleaved": (4, ["parallel.pp=2", "parallel.tp=2", "parallel.sp=true",
                                   "parallel.vpp=2", "parallel.schedule=interleaved_1f1b"]),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_world(world: int, cases: list[dict], out: Path) -> None:
    spec = out / f"cases{world}.json"
    spec.write_text(json.dumps(cases))
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_PORT": str(port),
               "CASES": str(spec), "OUT": str(out), "OMP_NUM_THREADS": "1"}
        log = open(out / f"world{world}.rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.helpers.parallel_world"],
                                      env=env, stdout=log, stderr=subprocess.STDOUT,
                                      cwd=Path(__file__).parent.parent))
    try:
        for p in procs:
            p.wait(timeout=240)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, p in enumerate(procs):
        assert p.returncode == 0, (out / f"world{world}.rank{rank}.log").read_text()[-4000:]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity")
    specs: dict[int, list[dict]] = {}
    runs = {}
    only = os.environ.get("PARITY_ONLY", "").split(",")  # debugging: run a subset
    for name, (world, overrides) in CASES.items():
        if only != [""] and name not in only:
            continue
        run = validate(compose_recipe([*BASE, *overrides, "--nproc-per-node", str(world)]))
        corpus = corpus_to_dict(prepare_corpus(run))
        p = run.parallel
        layout = {"dp_replicate": p.dp_replicate, "dp_shard": p.dp_shard, "pp": p.pp,
                  "tp": p.tp, "vpp": p.vpp}
        specs.setdefault(world, []).append({"name": name, "run": run.to_dict(),
                                            "layout": layout, "corpus": corpus})
        runs[name] = (run, corpus)
    for world, cases in specs.items():
        _run_world(world, cases, out)
    return out, runs


def _reference(run, corpus) -> dict:
    """The whole model in this process: loss.backward() on the global batch, clip, AdamW step."""
    torch.manual_seed(0)
    tokens = open_tokens(corpus_from_dict(corpus))
    t = run.trainer
    (lo, hi), _ = train_val_split(len(tokens), run.data.val_fraction, t.seq_len)
    windows = TokenWindows(tokens, t.seq_len, start=lo, stop=hi)
    ids = GlobalBatchSampler(len(windows), t.global_batch, t.seed).step_indices(0)
    x, y = windows.batch(ids)
    model = LlamaForCausalLM(model_config(run))
    model.init_weights(t.seed)
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                             reduction="sum") / (t.global_batch * t.seq_len)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt = build_adamw(model, run.optim)
    build_scheduler(opt, run.optim, t.steps)
    opt.step()
    return {"loss": loss.item(), "norm": float(norm), "grads": grads,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


@pytest.mark.parametrize("name", list(CASES))
def test_step_matches_unsplit_model(results, name):
    out, runs = results
    if name not in runs:
        pytest.skip("not selected by PARITY_ONLY")
    run, corpus = runs[name]
    ref = _reference(run, corpus)
    assert ref["norm"] > run.trainer.grad_clip * 2, "clipping must actually trigger"
    ranks = sorted(out.glob(f"{name}.rank*.pt"))
    assert len(ranks) == CASES[name][0]
    seen: set[str] = set()
    for f in ranks:
        got = torch.load(f, weights_only=False)
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(ref["norm"], rel=1e-4)
        for pname, g in got["grads"].items():
            torch.testing.assert_close(g, ref["grads"][pname], rtol=1e-4, atol=1e-6,
                                       msg=lambda m, p=pname, r=f.name: f"{r} grad {p}: {m}")
            torch.testing.assert_close(got["params"][pname], ref["params"][pname], rtol=1e-4,
                                       atol=1e-6, msg=lambda m, p=pname: f"param {p}: {m}")
            seen.add(pname)
    assert seen == set(ref["grads"]), "every parameter is held by some rank"
