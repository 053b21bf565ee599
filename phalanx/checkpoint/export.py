"""`phalanx export`: a checkpoint's model weights as a Hugging Face Llama in safetensors.

    phalanx export RUN_DIR_OR_CHECKPOINT --format safetensors [--out DIR]
                   [--max-shard-gb X] [--step N]

The source is a checkpoint directory (`.../step_000000120`), a run directory
(its newest verified checkpoint under `checkpoint.dir`, default
`RUN_DIR/checkpoints`), or a directory of checkpoints; `--step N` picks one
step instead of the newest. The checkpoint is verified against its manifest
(sizes and SHA-256 of every file) before DCP's `.metadata` pickle is read.

Only the `model/*` tensors are read, in this one process without
torch.distributed: DCP's metadata gives each tensor's global shape and dtype,
and DCP assembles it from whichever ranks' files hold its pieces, so a
checkpoint written by any dp / pp / tp / ZeRO layout exports the same. Our Llama
uses Hugging Face parameter names, so the tensors are written under their own
names (the `model/` prefix stripped). The output directory holds

    model.safetensors                              (or model-0000i-of-0000N.safetensors
                                                    + model.safetensors.index.json)
    config.json                                    HF LlamaConfig for LlamaForCausalLM
    phalanx_export.json                            source, step, how our model differs

and is written under a temporary name and renamed into place, so it is either
complete or absent. Shards are planned from the metadata and read one at a
time: memory peaks at about one shard, not the whole model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from phalanx.checkpoint import store
from phalanx.checkpoint.boxes import BoxLoadPlanner
from phalanx.checkpoint.state import MIRROR_PREFIX

__all__ = ["ExportError", "Source", "export_safetensors", "hf_config", "main", "plan_shards",
           "resolve_source"]

FORMATS = ("safetensors",)
DEFAULT_MAX_SHARD_GB = 5.0
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
NOTES_FILE = "phalanx_export.json"
MODEL_PREFIX = "model/"
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class ExportError(ValueError):
    """Input that cannot be exported (wrong path, no such step, not a Llama checkpoint)."""


@dataclass
class Source:
    """A verified checkpoint and what is known about the run that wrote it."""

    path: Path
    manifest: dict[str, Any]
    run_dir: Path | None = None
    run_config: dict[str, Any] | None = None
    # Newer checkpoints that failed verification and were passed over: (path, why).
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def step(self) -> int | None:
        step = self.manifest.get("step")
        return int(step) if step is not None else None


# ---------------------------------------------------------------------------- resolving

def _is_checkpoint_dir(p: Path) -> bool:
    return ((p / store.MANIFEST).exists() or (p / ".metadata").exists()
            or re.fullmatch(r"step_\d+", p.name) is not None)


def _load_run_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # YAML and OmegaConf errors have no common base
        raise ExportError(f"{path}: unreadable run config ({e})") from None
    return cfg if isinstance(cfg, dict) else None


def _checkpoint_root(run_dir: Path, run_config: dict[str, Any] | None) -> Path:
    """Where a run's checkpoints are: `checkpoint.dir` from its config.yaml, else
    RUN_DIR/checkpoints (the recipe's default)."""
    configured = ((run_config or {}).get("checkpoint") or {}).get("dir")
    if not configured:
        return run_dir / "checkpoints"
    p = Path(str(configured)).expanduser()
    # A relative checkpoint.dir was relative to where the run was launched, which we do not
    # know; the run directory is the likelier anchor when the cwd has no such directory.
    if not p.is_absolute() and not p.is_dir() and (run_dir / p).is_dir():
        return run_dir / p
    return p


def _available_steps(root: Path) -> str:
    steps = [p.name for p in store.list_checkpoints(root)]
    return ", ".join(steps[:8]) + (" ..." if len(steps) > 8 else "") if steps else "none"


def resolve_source(spec: str | Path, *, step: int | None = None,
                   token: str | None = None) -> Source:
    """The checkpoint `spec` names, verified. ExportError / store.CheckpointError when the
    path is not a checkpoint, the step does not exist, or no checkpoint passes verification."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise ExportError(f"{path} does not exist; give a run directory or a checkpoint "
                          "directory (RUN_DIR/checkpoints/step_NNNNNNNNN).")
    if not path.is_dir():
        raise ExportError(f"{path} is not a directory; give a run directory or a checkpoint "
                          "directory (RUN_DIR/checkpoints/step_NNNNNNNNN).")
    if _is_checkpoint_dir(path):
        # The default layout RUN_DIR/checkpoints/step_N tells us the run (tokenizer, precision).
        run_dir = path.parent.parent if (path.parent.parent / "config.yaml").is_file() else None
        manifest = store.verify(path, token=token)
        if step is not None and manifest.get("step") != step:
            raise ExportError(f"{path} is the checkpoint of step {manifest.get('step')}, not "
                              f"--step {step}; give its run directory to pick a step.")
        return Source(path, manifest, run_dir, _load_run_config(run_dir) if run_dir else None)

    if (path / "config.yaml").is_file() or (path / "checkpoints").is_dir():
        run_dir = path
        run_config = _load_run_config(path)
        root = _checkpoint_root(path, run_config)
    elif store.list_checkpoints(path):
        # A directory of step_* checkpoints: RUN_DIR/checkpoints, or a checkpoint.dir elsewhere.
        run_dir = path.parent if (path.parent / "config.yaml").is_file() else None
        run_config = _load_run_config(run_dir) if run_dir else None
        root = path
    else:
        raise ExportError(f"{path} is neither a checkpoint (no {store.MANIFEST}) nor a run "
                          "directory (no config.yaml or checkpoints/) nor a directory of "
                          "step_* checkpoints.")
    if step is not None:
        ckpt = store.step_dir(root, step)
        if not ckpt.is_dir():
            raise ExportError(f"no checkpoint of step {step} under {root} (have: "
                              f"{_available_steps(root)}).")
        return Source(ckpt, store.verify(ckpt, token=token), run_dir, run_config)
    ckpt, manifest, skipped = store.latest(root, token=token)
    if ckpt is None:
        why = "; ".join(f"{Path(p).name}: {w}" for p, w in skipped)
        raise store.CheckpointError(f"no checkpoint under {root} passes verification"
                                    + (f" ({why})" if why else " (there are none)"))
    return Source(ckpt, manifest, run_dir, run_config, skipped)


# ---------------------------------------------------------------------------- the model

def _llama_config(model: Mapping[str, Any]) -> Any:
    from phalanx.models import LlamaConfig

    names = {f.name for f in dataclasses.fields(LlamaConfig)}
    try:
        return LlamaConfig(**{k: v for k, v in model.items() if k in names})
    except TypeError as e:
        raise ExportError(f"the manifest's model config {dict(model)} is incomplete ({e})") from None


def expected_tensors(model: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of our LlamaForCausalLM for the manifest's model config (built
    on the meta device: no memory, whatever the size)."""
    from phalanx.models import LlamaForCausalLM

    config = _llama_config(model)
    try:
        with torch.device("meta"):
            m = LlamaForCausalLM(config)
    except ValueError as e:
        raise ExportError(f"the manifest's model config is not a valid Llama: {e}") from None
    return {k: tuple(t.shape) for k, t in m.state_dict().items()}


def _model_metadata(path: Path) -> dict[str, TensorStorageMetadata]:
    """`model/*` entries of DCP's index, prefix stripped. Call only after store.verify."""
    md = FileSystemReader(str(path)).read_metadata()
    out: dict[str, TensorStorageMetadata] = {}
    for key, meta in md.state_dict_metadata.items():
        if not key.startswith(MODEL_PREFIX) or key.startswith(MODEL_PREFIX + MIRROR_PREFIX):
            continue  # CheckFree+ mirrors are copies of tensors the owner stage saved
        if not isinstance(meta, TensorStorageMetadata):
            raise ExportError(f"{path}: {key} is not a tensor in the checkpoint")
        out[key[len(MODEL_PREFIX):]] = meta
    return out


def _check_against_model(path: Path, metas: Mapping[str, TensorStorageMetadata],
                         expected: Mapping[str, tuple[int, ...]]) -> None:
    """The checkpoint holds exactly the parameters (names and global shapes) of the model its
    manifest describes, each covered whole by its saved pieces."""
    missing = [k for k in expected if k not in metas]
    extra = [k for k in metas if k not in expected]
    if missing or extra:
        raise ExportError(f"{path}: model tensors do not match the manifest's Llama config "
                          f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                          f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})")
    for name, meta in metas.items():
        if tuple(meta.size) != expected[name]:
            raise ExportError(f"{path}: {name} has shape {tuple(meta.size)}, the manifest's "
                              f"model config says {expected[name]}")
        # DCP deduplicates replicated pieces, so disjoint chunks must add up to the tensor.
        covered = sum(math.prod(c.sizes) for c in meta.chunks)
        if covered != math.prod(meta.size):
            raise ExportError(f"{path}: {name} is incomplete ({covered} of "
                              f"{math.prod(meta.size)} elements saved)")


def _nbytes(meta: TensorStorageMetadata) -> int:
    return math.prod(meta.size) * torch.empty((), dtype=meta.properties.dtype).element_size()


def plan_shards(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Names grouped into files of at most max_bytes, in the order given (greedy, as
    transformers' save_pretrained does); a tensor larger than max_bytes gets a file alone."""
    shards: list[list[str]] = []
    used = 0
    for name, size in sizes.items():
        if not shards or (used + size > max_bytes and shards[-1]):
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


# ---------------------------------------------------------------------------- HF metadata

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tokenizer(run_config: Mapping[str, Any] | None, vocab_size: int) -> dict[str, Any]:
    """What the token ids mean, from the run's data recipe (the checkpoint does not say)."""
    data = (run_config or {}).get("data") or {}
    source, path = data.get("source"), str(data.get("path") or "")
    from phalanx.data.tokenizer import ByteTokenizer as B

    if source == "stdlib" or (source == "files" and not path.endswith(".bin")):
        ids = {"bos_token_id": B.BOS, "eos_token_id": B.EOS, "pad_token_id": B.PAD}
        return {"kind": "byte-level (phalanx.data.tokenizer.ByteTokenizer)",
                "ids": f"0-255 are raw UTF-8 bytes; {B.BOS} BOS, {B.EOS} EOS (ends each "
                       f"training file), {B.PAD} PAD; vocab_size {vocab_size}",
                "hf_tokenizer": "none written: transformers has no built-in byte tokenizer of "
                                "this form; encode text as list(text.encode('utf-8'))",
                "config_ids": ids if vocab_size >= B.vocab_size else {}}
    if source == "files":
        return {"kind": f"token ids read from {path} (data.token_dtype "
                        f"{data.get('token_dtype') or 'uint16'}); their tokenizer is yours",
                "hf_tokenizer": "none written: add the tokenizer files that made the .bin and "
                                "set bos/eos_token_id in config.json",
                "config_ids": {}}
    if source == "synthetic":
        return {"kind": "synthetic order-2 Markov tokens (data=synthetic): not text",
                "hf_tokenizer": "none", "config_ids": {}}
    return {"kind": "unknown: the checkpoint is not inside a run directory with config.yaml",
            "hf_tokenizer": "none written", "config_ids": {}}


def hf_config(model: Mapping[str, Any], dtype: torch.dtype,
              token_ids: Mapping[str, int] | None = None) -> dict[str, Any]:
    """config.json for transformers' LlamaForCausalLM. Both spellings of the RoPE base
    (`rope_theta`, transformers < 5 and most other readers; `rope_parameters`, transformers
    5) and of the dtype (`torch_dtype` / `dtype`) are written, with the same values."""
    c = _llama_config(model)
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
           **(token_ids or {})}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": float(c.rope_theta),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(c.rope_theta)},
        "rope_scaling": None,
        "rms_norm_eps": float(c.rms_norm_eps),
        "tie_word_embeddings": bool(c.tie_word_embeddings),
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": float(c.init_std),
        "use_cache": True,
        "torch_dtype": _dtype_name(dtype),
        "dtype": _dtype_name(dtype),
        **ids,
    }


def _notes(src: Source, dtype: torch.dtype, files: list[str], total: int,
           tokenizer: Mapping[str, Any]) -> dict[str, Any]:
    model = src.manifest["model"]
    precision = (src.run_config or {}).get("precision") or {}
    return {
        "exported_by": "phalanx export",
        "exported_unix": time.time(),
        "source_checkpoint": str(src.path.resolve()),
        "run_dir": str(src.run_dir.resolve()) if src.run_dir else None,
        "step": src.step,
        "recipe_hash": src.manifest.get("recipe_hash"),
        "model": dict(model),
        "files": files,
        "total_size": total,
        "weights": (f"{_dtype_name(dtype)} as stored in the checkpoint (the master weights"
                    + (f"; trained with precision.compute={precision.get('compute')}"
                       if precision.get("compute") else "") + ")"),
        "tokenizer": {k: v for k, v in tokenizer.items() if k != "config_ids"},
        "differences_from_hf_llama": [
            "None in the architecture: same parameter names and shapes, RMSNorm in fp32, "
            "rotate-half RoPE, SwiGLU, grouped-query attention, no biases (logits equal "
            "transformers' LlamaForCausalLM, tests/test_llama.py and tests/test_export.py).",
            f"RoPE is the plain kind only (rope_type default, theta {model.get('rope_theta')}): "
            "phalanx has no rope scaling (linear / dynamic / YaRN / llama3), so none is set.",
            f"phalanx refuses sequences longer than max_position_embeddings "
            f"({model.get('max_position_embeddings')}); transformers will run past it, on "
            "positions the model never saw.",
            "phalanx attention is causal with no padding mask (training never pads); with "
            "transformers pass attention_mask for left-padded batches as usual.",
        ],
    }


# ---------------------------------------------------------------------------- writing

def default_out(src: Source) -> Path:
    """RUN_DIR/export/step_N for a checkpoint of a known run, else CHECKPOINT-hf beside it
    (never inside it: pruning deletes checkpoint directories whole)."""
    if src.run_dir is not None:
        return src.run_dir / "export" / src.path.name
    return src.path.with_name(src.path.name + "-hf")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty; remove it or pick another "
                          "--out (an export is never mixed with an older one's files).")


def _read(path: Path, metas: Mapping[str, TensorStorageMetadata],
          names: list[str]) -> dict[str, torch.Tensor]:
    state = {MODEL_PREFIX + n: torch.empty(tuple(metas[n].size), dtype=metas[n].properties.dtype)
             for n in names}
    with warnings.catch_warnings():
        # "torch.distributed is disabled ... assuming the intent is to load in a single
        # process": that is the intent.
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, storage_reader=FileSystemReader(str(path)), planner=BoxLoadPlanner(),
                 no_dist=True)
    return {n: state[MODEL_PREFIX + n] for n in names}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def export_safetensors(src: Source, out: str | Path, *,
                       max_shard_bytes: int = int(DEFAULT_MAX_SHARD_GB * 1e9)) -> dict[str, Any]:
    """Write the verified checkpoint `src` as a Hugging Face Llama directory at `out`.
    Returns the notes written to phalanx_export.json."""
    out = Path(out).expanduser()
    if max_shard_bytes <= 0:
        raise ExportError(f"--max-shard-gb must be > 0 (got {max_shard_bytes / 1e9:g}).")
    model = src.manifest.get("model")
    if not isinstance(model, Mapping):
        raise ExportError(f"{src.path}: the manifest has no model config (not written by a "
                          "phalanx trainer?); cannot say what architecture these weights are.")
    _check_out(out)
    expected = expected_tensors(model)
    metas = _model_metadata(src.path)  # after verify (resolve_source): .metadata is a pickle
    _check_against_model(src.path, metas, expected)

    # The model's own order (embedding, layers 0.., norm, head): each shard holds
    # consecutive layers, as in transformers' own exports.
    sizes = {n: _nbytes(metas[n]) for n in expected}
    total = sum(sizes.values())
    shards = plan_shards(sizes, max_shard_bytes)
    n = len(shards)
    files = ([SINGLE_FILE] if n == 1 else
             [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)])
    dtypes = {m.properties.dtype for m in metas.values()}
    # One dtype in practice (precision.param); with several, the embedding's names the model.
    dtype = (metas["model.embed_tokens.weight"].properties.dtype if len(dtypes) > 1
             else dtypes.pop())
    tokenizer = _tokenizer(src.run_config, int(model["vocab_size"]))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        weight_map: dict[str, str] = {}
        for names, fname in zip(shards, files, strict=True):
            tensors = _read(src.path, metas, names)
            # {"format": "pt"} is what transformers checks to know the layout is PyTorch's.
            save_file(tensors, tmp / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, fname))
            del tensors  # one shard in memory at a time
        if n > 1:
            _write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total},
                                           "weight_map": weight_map})
        _write_json(tmp / "config.json", hf_config(model, dtype, tokenizer["config_ids"]))
        notes = _notes(src, dtype, files, total, tokenizer)
        _write_json(tmp / NOTES_FILE, notes)
        # safetensors creates its files owner-only (0600); give them the mode the umask gives
        # the JSON files, so whoever may read config.json may read the weights too.
        mode = (tmp / "config.json").stat().st_mode & 0o777
        for fname in files:
            os.chmod(tmp / fname, mode)
        _check_out(out)  # again: something may have appeared while we were writing
        if out.exists():
            out.rmdir()  # empty (checked): rename needs the name free
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return notes


# ---------------------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phalanx export",
        description="Export a checkpoint's model as a Hugging Face LlamaForCausalLM "
                    "(safetensors + config.json). Exit 0 exported, 1 failed while reading or "
                    "writing, 2 bad input (not a checkpoint, no such step, corrupted).")
    p.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run directory (newest verified checkpoint), a checkpoint directory, "
                        "or a directory of step_* checkpoints")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", help="output directory (default RUN_DIR/export/step_N, or "
                                 "CHECKPOINT-hf beside a checkpoint outside a run directory)")
    p.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_GB,
                   help="largest safetensors file in GB (1e9 bytes) before sharding "
                        f"(default {DEFAULT_MAX_SHARD_GB:g})")
    p.add_argument("--step", type=int, help="export this step's checkpoint, not the newest")
    return p


def _fail(code: int, msg: str) -> int:
    print(f"phalanx export: error: {msg}", file=sys.stderr)
    return code


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if not args.max_shard_gb > 0:
        return _fail(EXIT_BAD_INPUT, f"--max-shard-gb must be > 0 (got {args.max_shard_gb:g}).")
    token = os.environ.get("PHALANX_TOKEN") or None
    try:
        src = resolve_source(args.source, step=args.step, token=token)
        out = Path(args.out) if args.out else default_out(src)
        notes = export_safetensors(src, out, max_shard_bytes=int(args.max_shard_gb * 1e9))
    except (ExportError, store.CheckpointError) as e:
        return _fail(EXIT_BAD_INPUT, f"{e}")
    except (OSError, RuntimeError, CheckpointException) as e:
        # Verified input that still could not be read or written (disk full, permissions,
        # a file changed after verification).
        return _fail(EXIT_FAILED, f"export failed: {type(e).__name__}: {e}")
    if src.skipped:
        # store.latest logged each one's reason; repeat which, so it is next to the result.
        print(f"phalanx export: passed over {len(src.skipped)} newer checkpoint(s) that failed "
              f"verification: {', '.join(Path(p).name for p, _ in src.skipped)}", file=sys.stderr)
    print(f"phalanx export: step {notes['step']} from {src.path} -> {out} "
          f"({len(notes['files'])} file{'s' if len(notes['files']) > 1 else ''}, "
          f"{notes['total_size'] / 1e6:.1f} MB, {notes['model'].get('name', 'llama')}); load it "
          f"with transformers.LlamaForCausalLM.from_pretrained({str(out)!r})")
    return 0
