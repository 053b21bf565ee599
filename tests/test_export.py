"""`phalanx export`: a checkpoint becomes a Hugging Face Llama that transformers loads with
the same logits; shards; picks the newest verified checkpoint or --step; refuses a
corrupted one before reading it.

Checkpoints are written in-process by store.save (single-process DCP), the same format a
training run writes, inside a run directory like the one `phalanx run` leaves.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phalanx.checkpoint import store
from phalanx.launch.cli import main as cli_main
from phalanx.models import LlamaConfig, LlamaForCausalLM

TINY = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                   rope_theta=500000.0)
TIED = dataclasses.replace(TINY, tie_word_embeddings=True)


def _model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    m = LlamaForCausalLM(config)
    m.init_weights(seed)
    return m.eval()


def _save(root: Path, step: int, model: LlamaForCausalLM, **meta) -> Path:
    """A checkpoint as a trainer writes one: model, optimizer moments, step, RNG."""
    state: dict = {f"model/{k}": v for k, v in model.state_dict().items()}
    # Non-model entries the export must leave unread.
    state |= {f"optim/{k}/exp_avg": torch.zeros_like(v) for k, v in model.state_dict().items()}
    state["trainer/step"] = torch.tensor(step, dtype=torch.int64)
    state["rng/rank0"] = torch.get_rng_state()
    model_dict = {"name": "tiny_test", **dataclasses.asdict(model.config)}
    path = store.step_dir(root, step)
    store.save(state, path, meta={"step": step, "model": model_dict, **meta})
    return path


def _run_dir(tmp_path: Path, config: LlamaConfig = TINY, steps=((5, 0), (10, 1))) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    # The part of a resolved config.yaml the export reads (tokenizer from the data source).
    (run / "config.yaml").write_text("data:\n  source: stdlib\nprecision:\n  compute: fp32\n"
                                     "checkpoint:\n  dir: null\n")
    for step, seed in steps:
        _save(run / "checkpoints", step, _model(config, seed))
    return run


def _logits_match(out: Path, ours: LlamaForCausalLM) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert next(hf.parameters()).dtype == torch.float32  # from config.json's dtype
    tokens = torch.randint(0, ours.config.vocab_size, (2, 16), generator=torch.Generator()
                           .manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), atol=1e-5, rtol=0)


def _export(*args: str) -> int:
    return cli_main(["export", *map(str, args)])


@pytest.mark.parametrize("config", [TINY, TIED], ids=["untied", "tied"])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, config, capsys):
    run = _run_dir(tmp_path, config, steps=[(5, 3)])
    out = tmp_path / "hf"
    assert _export(run, "--format", "safetensors", "--out", out) == 0
    assert "step 5" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                      "phalanx_export.json"]
    ours = _model(config, 3)
    tensors = load_file(out / "model.safetensors")
    assert tensors.keys() == ours.state_dict().keys()  # HF names, no "model/" prefix
    _logits_match(out, ours)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["tie_word_embeddings"] is config.tie_word_embeddings
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (256, 257, 258)
    notes = json.loads((out / "phalanx_export.json").read_text())
    assert notes["step"] == 5
    assert notes["source_checkpoint"] == str(store.step_dir(run / "checkpoints", 5).resolve())
    assert "byte-level" in notes["tokenizer"]["kind"]


def test_newest_verified_by_default_and_step(tmp_path, capsys):
    run = _run_dir(tmp_path)  # step 5 from seed 0, step 10 from seed 1
    assert _export(run, "--format", "safetensors") == 0
    newest = run / "export" / "step_000000010"  # the default --out
    want = _model(TINY, 1).state_dict()
    got = load_file(newest / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)

    assert _export(run, "--format", "safetensors", "--step", "5") == 0
    got = load_file(run / "export" / "step_000000005" / "model.safetensors")
    want = _model(TINY, 0).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)

    # A corrupted newest checkpoint is passed over, and the user is told which.
    distcp = next(store.step_dir(run / "checkpoints", 10).glob("*.distcp"))
    _flip_byte(distcp)
    capsys.readouterr()
    assert _export(run, "--format", "safetensors", "--out", tmp_path / "fallback") == 0
    captured = capsys.readouterr()
    assert "step 5" in captured.out and "step_000000010" in captured.err
    assert json.loads((tmp_path / "fallback" / "phalanx_export.json").read_text())["step"] == 5


def test_sharded_export_loads(tmp_path, phalanx_exe):
    run = _run_dir(tmp_path, steps=[(5, 2)])
    out = tmp_path / "sharded"
    # 100 KB per file; the largest tensors (embedding, head) are 33 KB: several files.
    proc = subprocess.run([*phalanx_exe, "export", str(run), "--format", "safetensors",
                           "--out", str(out), "--max-shard-gb", "0.0001"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(files)
    assert n > 1 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    ours = _model(TINY, 2)
    sd = ours.state_dict()
    assert index["weight_map"].keys() == sd.keys()
    assert set(index["weight_map"].values()) == set(files)
    # In the model's order, so each file holds consecutive layers.
    assert index["weight_map"]["model.embed_tokens.weight"] == files[0]
    assert index["weight_map"]["lm_head.weight"] == files[-1]
    # Readable by whoever may read config.json (safetensors alone would create them 0600).
    mode = (out / "config.json").stat().st_mode & 0o777
    assert all((out / f).stat().st_mode & 0o777 == mode for f in files)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in sd.values())
    per_file = dict.fromkeys(files, 0)
    for name, f in index["weight_map"].items():
        per_file[f] += sd[name].nbytes
    assert max(per_file.values()) <= 100_000
    _logits_match(out, ours)


def _flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_checkpoint_is_refused_naming_the_file(tmp_path, capsys):
    run = _run_dir(tmp_path, steps=[(5, 0)])
    ckpt = store.step_dir(run / "checkpoints", 5)
    distcp = next(ckpt.glob("*.distcp"))
    _flip_byte(distcp)
    out = tmp_path / "hf"
    assert _export(ckpt, "--format", "safetensors", "--out", out) == 2
    err = capsys.readouterr().err
    assert distcp.name in err and "checksum mismatch" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".hf.tmp-*"))
    # Through the run directory: nothing else to fall back to.
    assert _export(run, "--format", "safetensors", "--out", out) == 2
    assert distcp.name in capsys.readouterr().err


class _Boom:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_tampered_metadata_is_not_unpickled(tmp_path, capsys):
    run = _run_dir(tmp_path, steps=[(5, 0)])
    ckpt = store.step_dir(run / "checkpoints", 5)
    marker = tmp_path / "unpickled"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Boom(marker)))
    assert _export(ckpt, "--format", "safetensors", "--out", tmp_path / "hf") == 2
    assert ".metadata" in capsys.readouterr().err
    assert not marker.exists()
    pickle.loads((ckpt / ".metadata").read_bytes())  # the trap is armed: reading it would fire
    assert marker.exists()


def test_bad_input_exits_2_without_traceback(tmp_path, capsys):
    run = _run_dir(tmp_path, steps=[(5, 0)])
    cases = [
        ([tmp_path / "nope"], "does not exist"),
        ([tmp_path], "neither a checkpoint"),
        ([run, "--step", "7"], "no checkpoint of step 7"),
        ([store.step_dir(run / "checkpoints", 5), "--step", "6"], "not --step 6"),
        ([run, "--max-shard-gb", "0"], "must be > 0"),
    ]
    (run / "export" / "step_000000005").mkdir(parents=True)
    (run / "export" / "step_000000005" / "keep.txt").write_text("mine")
    cases.append(([run], "not empty"))
    for args, msg in cases:
        assert _export(*args, "--format", "safetensors") == 2, args
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (args, err)
    assert (run / "export" / "step_000000005" / "keep.txt").read_text() == "mine"

    # A checkpoint whose manifest does not say what model it holds (a directory of step_*).
    other = tmp_path / "other"
    store.save({"model/x": torch.zeros(2), "trainer/step": torch.tensor(4)},
               store.step_dir(other, 4), meta={"step": 4})
    assert _export(other, "--format", "safetensors", "--out", tmp_path / "o") == 2
    assert "no model config" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: an unknown format is bad input too
        _export(run, "--format", "gguf")
    assert e.value.code == 2
