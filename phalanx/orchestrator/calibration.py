"""Calibration data: fits of the probes' measurements, and the profile file the planner reads.

The probes (``phalanx.parallel.profile``) run on the real workers and return raw records;
this module turns them into a ``Profile`` -- numbers only, no torch:

- compute (decoder block per recompute mode and TP variant, embedding, head): forward and
  backward seconds vs micro-batch size, ``t = a + b * mbs``;
- optimizer: ``t = per_step + per_param * numel + per_tensor * tensors`` for AdamW and
  gradient clipping, on model-held parameter lists and on ZeRO's flat shards;
- collectives per link class (``intra``: ranks of one machine) and op: the alpha-beta
  model ``t = alpha + bytes / beta``;
- the oversubscription factor: how much slower the same block runs with two ranks per
  core than with one (DESIGN.md: bigger worlds than cores are measured, not goaled).

Fits are least squares on relative residuals (each point weighted by 1 / its time), so
small and large points are fitted to the same relative accuracy; every fit keeps its raw
points, its R^2 and its largest relative residual, and has an ``interp`` that follows the
points where a straight line does not (gloo's algorithm switches, allocator page faults).

Profiles are cached per machine and model: ``$PHALANX_CACHE/profiles/<machine>-<model>.json``
(``PHALANX_CACHE`` defaults to ``~/.cache/phalanx``), where ``<machine>`` hashes the CPU
model, usable cores, torch and Python versions, and ``<model>`` the model dims, the
sequence length and the compute dtype (compute fits are per model).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "AlphaBetaFit",
    "CostFit",
    "LinearFit",
    "Profile",
    "build_profile",
    "cache_path",
    "cache_root",
    "fit_alpha_beta",
    "fit_cost",
    "fit_linear",
    "load_or_none",
    "machine_fingerprint",
    "model_dims",
    "model_key",
    "summary",
]

SCHEMA_VERSION = 1
LINK_CLASSES = ("intra",)
MODEL_DIMS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")


# -- fitting ------------------------------------------------------------------------------------

def _wls(design: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares on relative residuals: minimise sum(((design @ c - y) / y)^2)."""
    w = np.where(y > 0, 1.0 / np.where(y > 0, y, 1.0), 1.0)
    coef, *_ = np.linalg.lstsq(design * w[:, None], y * w, rcond=None)
    return coef


def _quality(pred: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(R^2, max relative residual) of predictions against measurements."""
    res = pred - y
    ss_res = float(np.sum(res ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot > 0:
        r2 = 1.0 - ss_res / ss_tot
    else:
        r2 = 1.0 if ss_res <= 1e-30 else 0.0
    denom = np.where(np.abs(y) > 0, np.abs(y), 1.0)
    return r2, float(np.max(np.abs(res) / denom)) if len(y) else 0.0


def _interp_1d(xs: Sequence[float], ys: Sequence[float], x: float, slope: float) -> float:
    """Piecewise-linear through the points; the first point's value below them (small sizes
    are latency-bound), the last point plus ``slope`` per unit above them."""
    if x <= xs[0]:
        return float(ys[0])
    if x >= xs[-1]:
        if len(xs) >= 2 and xs[-1] > xs[-2]:
            slope = max(slope, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
        return float(ys[-1] + slope * (x - xs[-1]))
    return float(np.interp(x, xs, ys))


@dataclass(frozen=True)
class LinearFit:
    """``t = a + b * x`` seconds; x is the micro-batch size (sequences of seq_len tokens)."""

    a: float
    b: float
    r2: float
    max_rel_residual: float
    points: tuple[tuple[float, float], ...]  # (x, seconds)

    def __call__(self, x: float) -> float:
        return self.a + self.b * x

    def interp(self, x: float) -> float:
        xs, ys = zip(*self.points, strict=True)
        return _interp_1d(xs, ys, x, self.b)

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "r2": self.r2, "max_rel_residual": self.max_rel_residual,
                "points": [list(p) for p in self.points]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LinearFit:
        return cls(a=float(d["a"]), b=float(d["b"]), r2=float(d["r2"]),
                   max_rel_residual=float(d["max_rel_residual"]),
                   points=tuple((float(x), float(y)) for x, y in d["points"]))


def fit_linear(xs: Sequence[float], ys: Sequence[float]) -> LinearFit:
    """``y = a + b x`` by least squares on relative residuals (one point: a line through 0)."""
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"fit_linear needs matching non-empty points, got {len(xs)} and {len(ys)}")
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    x = np.array([xs[i] for i in order], dtype=float)
    y = np.array([ys[i] for i in order], dtype=float)
    if len(set(x.tolist())) < 2:
        a, b = 0.0, float(np.mean(y / np.where(x != 0, x, 1.0)))
    else:
        a, b = (float(c) for c in _wls(np.stack([np.ones_like(x), x], axis=1), y))
    r2, rel = _quality(a + b * x, y)
    return LinearFit(a=a, b=b, r2=r2, max_rel_residual=rel,
                     points=tuple(zip(x.tolist(), y.tolist(), strict=True)))


@dataclass(frozen=True)
class AlphaBetaFit:
    """``t = alpha + bytes / beta`` seconds for one collective over a group of ``group_size``.

    Bytes are the full buffer's: the all-reduced tensor, all_gather_into_tensor's output,
    reduce_scatter_tensor's input, one P2P message (``p2p``: one direction; ``p2p_bidir``:
    this size each way at once). Times are the slowest rank's trimmed mean over reps
    (``_fit_collectives``).
    """

    alpha_s: float
    beta_bytes_per_s: float
    r2: float
    max_rel_residual: float
    group_size: int
    points: tuple[tuple[float, float], ...]  # (bytes, seconds): what the fit is of
    # Other statistics of the same reps, when the probe recorded them (bytes, seconds):
    # the median and the fastest rep (a rank that never idled before the op; see
    # _fit_collectives on why the fit takes the mean).
    median_points: tuple[tuple[float, float], ...] = ()
    min_points: tuple[tuple[float, float], ...] = ()

    def time(self, nbytes: float) -> float:
        return self.alpha_s + nbytes / self.beta_bytes_per_s

    def interp(self, nbytes: float) -> float:
        xs, ys = zip(*self.points, strict=True)
        return _interp_1d(xs, ys, nbytes, 1.0 / self.beta_bytes_per_s)

    def to_dict(self) -> dict[str, Any]:
        return {"alpha_s": self.alpha_s, "beta_bytes_per_s": self.beta_bytes_per_s, "r2": self.r2,
                "max_rel_residual": self.max_rel_residual, "group_size": self.group_size,
                "points": [list(p) for p in self.points],
                "median_points": [list(p) for p in self.median_points],
                "min_points": [list(p) for p in self.min_points]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AlphaBetaFit:
        def pts(key: str) -> tuple[tuple[float, float], ...]:
            return tuple((float(x), float(y)) for x, y in d.get(key, ()))

        return cls(alpha_s=float(d["alpha_s"]), beta_bytes_per_s=float(d["beta_bytes_per_s"]),
                   r2=float(d["r2"]), max_rel_residual=float(d["max_rel_residual"]),
                   group_size=int(d["group_size"]), points=pts("points"),
                   median_points=pts("median_points"), min_points=pts("min_points"))


def fit_alpha_beta(nbytes: Sequence[float], seconds: Sequence[float], *,
                   group_size: int = 2) -> AlphaBetaFit:
    """alpha (s) and beta (bytes/s) by least squares on relative residuals; alpha >= 0."""
    if len(nbytes) != len(seconds) or not nbytes:
        raise ValueError("fit_alpha_beta needs matching non-empty points")
    order = sorted(range(len(nbytes)), key=lambda i: nbytes[i])
    x = np.array([nbytes[i] for i in order], dtype=float)
    y = np.array([seconds[i] for i in order], dtype=float)
    alpha, inv_beta = 0.0, 0.0
    if len(set(x.tolist())) >= 2:
        alpha, inv_beta = (float(c) for c in _wls(np.stack([np.ones_like(x), x], axis=1), y))
    if alpha < 0 or len(set(x.tolist())) < 2:  # no negative latency: bandwidth alone
        alpha = 0.0
        inv_beta = float(_wls(x[:, None], y)[0])
    inv_beta = max(inv_beta, 1e-18)
    r2, rel = _quality(alpha + inv_beta * x, y)
    return AlphaBetaFit(alpha_s=alpha, beta_bytes_per_s=1.0 / inv_beta, r2=r2,
                        max_rel_residual=rel, group_size=int(group_size),
                        points=tuple(zip(x.tolist(), y.tolist(), strict=True)))


@dataclass(frozen=True)
class CostFit:
    """``t = per_step_s + per_param_s * numel + per_tensor_s * tensors`` seconds."""

    per_step_s: float
    per_param_s: float
    per_tensor_s: float
    r2: float
    max_rel_residual: float
    points: tuple[tuple[float, float, float], ...]  # (numel, tensors, seconds)

    def time(self, numel: float, tensors: float = 1) -> float:
        return self.per_step_s + self.per_param_s * numel + self.per_tensor_s * tensors

    def interp(self, numel: float) -> float:
        """Along numel through the points (for single flat tensors, whose cost per element
        jumps where their temporaries outgrow the allocator's heap)."""
        pts = sorted(self.points)
        return _interp_1d([p[0] for p in pts], [p[2] for p in pts], numel, self.per_param_s)

    def to_dict(self) -> dict[str, Any]:
        return {"per_step_s": self.per_step_s, "per_param_s": self.per_param_s,
                "per_tensor_s": self.per_tensor_s, "r2": self.r2,
                "max_rel_residual": self.max_rel_residual, "points": [list(p) for p in self.points]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CostFit:
        return cls(per_step_s=float(d["per_step_s"]), per_param_s=float(d["per_param_s"]),
                   per_tensor_s=float(d["per_tensor_s"]), r2=float(d["r2"]),
                   max_rel_residual=float(d["max_rel_residual"]),
                   points=tuple((float(a), float(b), float(c)) for a, b, c in d["points"]))


def fit_cost(numels: Sequence[float], tensors: Sequence[float], seconds: Sequence[float], *,
             per_tensor: bool = True) -> CostFit:
    """Least squares on relative residuals; ``per_tensor=False`` (all points one tensor, e.g.
    flat shards) fits per-step + per-param only."""
    n = np.array(numels, dtype=float)
    k = np.array(tensors, dtype=float)
    y = np.array(seconds, dtype=float)
    if not len(y) or not (len(n) == len(k) == len(y)):
        raise ValueError("fit_cost needs matching non-empty points")
    cols = [np.ones_like(n), n] + ([k] if per_tensor else [])
    coef = [float(c) for c in _wls(np.stack(cols, axis=1), y)]
    c0, c1, c2 = coef[0], coef[1], coef[2] if per_tensor else 0.0
    r2, rel = _quality(c0 + c1 * n + c2 * k, y)
    return CostFit(per_step_s=c0, per_param_s=c1, per_tensor_s=c2, r2=r2, max_rel_residual=rel,
                   points=tuple(zip(n.tolist(), k.tolist(), y.tolist(), strict=True)))


# -- machine and model keys, cache ---------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _torch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:  # pragma: no cover - torch is a dependency
        return "unknown"


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def machine_fingerprint() -> dict[str, Any]:
    """What a profile is valid for: CPU model, usable cores, torch, Python (and its hash)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    fp = {"cpu_model": _cpu_model(), "usable_cores": cores, "torch": _torch_version(),
          "python": platform.python_version()}
    return {**fp, "fingerprint": _hash(fp)}


def model_dims(model: Any) -> dict[str, Any]:
    """The dims that change compute cost, from a recipe ModelConfig, a LlamaConfig or a dict."""
    get = model.get if isinstance(model, Mapping) else lambda k: getattr(model, k)
    return {k: (bool(get(k)) if k == "tie_word_embeddings" else int(get(k))) for k in MODEL_DIMS}


def model_key(model: Any, *, seq_len: int, compute_dtype: str) -> str:
    return _hash({"dims": model_dims(model), "seq_len": int(seq_len), "dtype": str(compute_dtype)})


def cache_root() -> Path:
    return Path(os.environ.get("PHALANX_CACHE") or "~/.cache/phalanx").expanduser()


def cache_path(model: Any, *, seq_len: int, compute_dtype: str,
               machine: Mapping[str, Any] | None = None, root: Path | None = None) -> Path:
    """``<root>/profiles/<machine fingerprint>-<model key>.json``."""
    fp = (machine or machine_fingerprint())["fingerprint"]
    key = model_key(model, seq_len=seq_len, compute_dtype=compute_dtype)
    return (root or cache_root()) / "profiles" / f"{fp}-{key}.json"


# -- the profile -----------------------------------------------------------------------------

def variant_key(tp: int, sp: bool) -> str:
    """'tp1', 'tp2', 'tp2_sp' (same names as phalanx.parallel.profile)."""
    return f"tp{tp}" + ("_sp" if sp and tp > 1 else "")


@dataclass
class Profile:
    """Everything the cost model reads. See ``to_json`` for the file's exact keys.

    compute["block"][variant][recompute] = {"fwd": LinearFit, "bwd": LinearFit}
    compute["embedding" | "head"][variant] = {"fwd": LinearFit, "bwd": LinearFit}
    optimizer["adamw" | "adamw_flat" | "clip" | "clip_flat" | "clip_ddp"] = CostFit
    collectives[link][op] = AlphaBetaFit
    """

    machine: dict[str, Any]
    model: dict[str, Any]
    seq_len: int
    compute_dtype: str
    compute: dict[str, dict[str, Any]] = field(default_factory=dict)
    optimizer: dict[str, CostFit] = field(default_factory=dict)
    collectives: dict[str, dict[str, AlphaBetaFit]] = field(default_factory=dict)
    oversubscription: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    # -- queries (seconds) --
    def compute_time(self, part: str, phase: str, mbs: float, *, recompute: str = "none",
                     tp: int = 1, sp: bool = False) -> float:
        """``part`` block / embedding / head, ``phase`` fwd / bwd, per micro-batch of ``mbs``."""
        v = variant_key(tp, sp)
        try:
            entry = self.compute[part][v]
            if part == "block":
                entry = entry[recompute]
            return entry[phase](mbs)
        except KeyError:
            raise KeyError(f"profile has no {part} {phase} for {v} recompute={recompute}; it has "
                           f"{sorted(self.compute.get(part, {}))}") from None

    def collective_time(self, op: str, nbytes: float, *, link: str = "intra",
                        interp: bool = False) -> float:
        fit = self.collectives[link][op]
        return fit.interp(nbytes) if interp else fit.time(nbytes)

    # -- file --
    def to_dict(self) -> dict[str, Any]:
        def comp(node: Any) -> Any:
            if isinstance(node, LinearFit):
                return node.to_dict()
            return {k: comp(v) for k, v in node.items()}

        over = None
        if self.oversubscription is not None:
            over = {k: ({op: f.to_dict() for op, f in v.items()} if k == "collectives" else v)
                    for k, v in self.oversubscription.items()}
        return {"schema_version": self.schema_version, "machine": dict(self.machine),
                "model": dict(self.model), "seq_len": self.seq_len,
                "compute_dtype": self.compute_dtype, "compute": comp(self.compute),
                "optimizer": {k: f.to_dict() for k, f in self.optimizer.items()},
                "collectives": {link: {op: f.to_dict() for op, f in ops.items()}
                                for link, ops in self.collectives.items()},
                "oversubscription": over, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Profile:
        def comp(node: Mapping[str, Any]) -> Any:
            if "points" in node and "a" in node:
                return LinearFit.from_dict(node)
            return {k: comp(v) for k, v in node.items()}

        over = d.get("oversubscription")
        if over is not None:
            over = {k: ({op: AlphaBetaFit.from_dict(f) for op, f in v.items()}
                        if k == "collectives" else v) for k, v in over.items()}
        return cls(machine=dict(d["machine"]), model=dict(d["model"]), seq_len=int(d["seq_len"]),
                   compute_dtype=str(d["compute_dtype"]), compute=comp(d["compute"]),
                   optimizer={k: CostFit.from_dict(f) for k, f in d["optimizer"].items()},
                   collectives={link: {op: AlphaBetaFit.from_dict(f) for op, f in ops.items()}
                                for link, ops in d["collectives"].items()},
                   oversubscription=over, meta=dict(d.get("meta", {})),
                   schema_version=int(d["schema_version"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Profile:
        return cls.from_dict(json.loads(text))

    def save(self, path: Path) -> Path:
        """Write atomically (temp file, then rename), parents created."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path


def load_or_none(model: Any, *, seq_len: int, compute_dtype: str,
                 root: Path | None = None) -> Profile | None:
    """The cached profile of this machine for this model / seq_len / dtype, or None (missing,
    unreadable, another schema version, or measured on another machine)."""
    machine = machine_fingerprint()
    path = cache_path(model, seq_len=seq_len, compute_dtype=compute_dtype, machine=machine,
                      root=root)
    try:
        prof = Profile.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if prof.schema_version != SCHEMA_VERSION:
        return None
    if prof.machine.get("fingerprint") != machine["fingerprint"]:
        return None
    if prof.model.get("key") != model_key(model, seq_len=seq_len, compute_dtype=compute_dtype):
        return None
    return prof


# -- from probe records to a profile ---------------------------------------------------------------

def _best_by(records: Iterable[Mapping[str, Any]], keys: Sequence[str],
             values: Sequence[str]) -> dict[tuple, dict[str, float]]:
    """Per distinct tuple of ``keys``, the least disturbed rank's figure (the min over ranks
    of each rank's median): every rank of the pinned world runs the same probe on its own
    core at the same time, so ranks differ only by what else ran on their core."""
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        g = groups[tuple(r[k] for k in keys)]
        for v in values:
            g[v].append(float(r[v]))
    return {k: {v: min(xs) for v, xs in g.items()} for k, g in groups.items()}


def _fit_compute(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    comp = [r for r in records if r["probe"] in ("block", "embedding", "head")]
    med = _best_by(comp, ("probe", "variant", "recompute", "mbs"), ("fwd_s", "bwd_s"))
    series: dict[tuple, list[tuple[int, dict[str, float]]]] = defaultdict(list)
    for (part, variant, rc, mbs), vals in med.items():
        series[(part, variant, rc)].append((mbs, vals))
    out: dict[str, dict[str, Any]] = {}
    for (part, variant, rc), pts in sorted(series.items()):
        pts.sort()
        fits = {ph: fit_linear([m for m, _ in pts], [v[f"{ph}_s"] for _, v in pts])
                for ph in ("fwd", "bwd")}
        if part == "block":
            out.setdefault(part, {}).setdefault(variant, {})[rc] = fits
        else:
            out.setdefault(part, {})[variant] = fits
    return out


def _fit_optimizer(records: Sequence[Mapping[str, Any]]) -> dict[str, CostFit]:
    opt = [r for r in records if r["probe"] == "optimizer"]
    med = _best_by(opt, ("kind", "case", "numel", "tensors"), ("adamw_s", "clip_s", "clip_ddp_s"))
    out: dict[str, CostFit] = {}
    for name, kind, value in (("adamw", "list", "adamw_s"), ("adamw_flat", "flat", "adamw_s"),
                              ("clip", "list", "clip_s"), ("clip_flat", "flat", "clip_s"),
                              ("clip_ddp", "list", "clip_ddp_s")):
        pts = sorted((k[2], k[3], v[value]) for k, v in med.items() if k[0] == kind)
        if pts:
            out[name] = fit_cost([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts],
                                 per_tensor=kind == "list" and len(pts) >= 3)
    return out


def _fit_collectives(records: Sequence[Mapping[str, Any]]) -> dict[str, AlphaBetaFit]:
    """Per op: the slowest rank's figure per size (an op is done when every participant
    is), fitted on the trimmed mean, not the median: on pinned ranks of a VM the latency is
    bimodal (~0.1 ms, or ~2-4 ms when the rank's idle vCPU must be woken up), and a step's
    many operations add up to their mean."""
    worst: dict[tuple[str, int], dict[str, dict[int, float]]] = defaultdict(
        lambda: defaultdict(dict))
    for r in records:
        if r["probe"] == "collective":
            d = worst[(r["op"], int(r["group_size"]))]
            for stat, key in (("mean", "mean_s"), ("median", "s"), ("min", "min_s")):
                if key in r or stat == "mean":
                    t = float(r.get(key, r["s"]))
                    d[stat][int(r["bytes"])] = max(d[stat].get(int(r["bytes"]), 0.0), t)
    out: dict[str, AlphaBetaFit] = {}
    for (op, n), stats in sorted(worst.items()):
        xs = sorted(stats["mean"])
        fit = fit_alpha_beta(xs, [stats["mean"][x] for x in xs], group_size=n)
        out[op] = dataclasses.replace(
            fit, median_points=tuple(sorted(stats["median"].items())),
            min_points=tuple(sorted(stats["min"].items())))
    return out


def _oversubscription(pinned: Sequence[Mapping[str, Any]], over: Sequence[Mapping[str, Any]], *,
                      ranks: int, cores: int) -> dict[str, Any] | None:
    """The block's fwd+bwd time with ``ranks`` ranks on ``cores`` cores vs one rank per core.

    ``measured_factor``: the wall-time ratio, i.e. whatever shared the cores meanwhile,
    other tenants of the machine included. ``compute_factor`` (what to plan with): ranks
    per core x the ratio of the oversubscribed ranks' thread CPU time per iteration to the
    pinned time -- the fair share of a core plus what sharing it costs beyond that (cache
    refills after every switch) -- which other tenants do not inflate; the two agree on a
    quiet machine.
    """
    def per_mbs(records: Sequence[Mapping[str, Any]], keys: tuple[str, str],
                over_ranks: Any) -> dict[int, float]:
        sel = [r for r in records if r["probe"] == "block" and r["variant"] == "tp1"
               and r["recompute"] == "none" and all(k in r for k in keys)]
        by: dict[int, list[float]] = defaultdict(list)
        for r in sel:
            by[int(r["mbs"])].append(float(r[keys[0]]) + float(r[keys[1]]))
        return {m: over_ranks(v) for m, v in by.items()}

    # Pinned: as the compute fits (the least disturbed rank); oversubscribed: the median rank
    # (ranks share cores by design there, and the luckiest one is not the typical one).
    a = per_mbs(pinned, ("fwd_s", "bwd_s"), min)
    b = per_mbs(over, ("fwd_s", "bwd_s"), statistics.median)
    c = per_mbs(over, ("fwd_cpu_s", "bwd_cpu_s"), statistics.median)
    common = sorted(set(a) & set(b))
    if not common:
        return None
    per_core = ranks / max(1, cores)
    measured = statistics.median(b[m] / a[m] for m in common)
    share = (per_core * statistics.median(c[m] / a[m] for m in common)
             if set(common) <= set(c) else measured)
    return {"ranks": ranks, "cores": cores, "ranks_per_core": per_core,
            "compute_factor": share, "measured_factor": measured,
            "probe": "block tp1 recompute=none fwd+bwd",
            "points": [[m, a[m], b[m], c.get(m, b[m] / per_core)] for m in common],
            "collectives": _fit_collectives(over)}


def build_profile(pinned: Sequence[Mapping[str, Any]], *, model: Any, seq_len: int,
                  compute_dtype: str, machine: Mapping[str, Any] | None = None,
                  oversubscribed: Sequence[Mapping[str, Any]] | None = None,
                  over_ranks: int = 0, over_cores: int = 0,
                  meta: Mapping[str, Any] | None = None) -> Profile:
    """Fit the records of the pinned world (and of the oversubscribed one) into a Profile."""
    machine = dict(machine or machine_fingerprint())
    dims = model_dims(model)
    prof = Profile(machine=machine,
                   model={**dims, "key": model_key(model, seq_len=seq_len,
                                                   compute_dtype=compute_dtype)},
                   seq_len=int(seq_len), compute_dtype=str(compute_dtype))
    prof.compute = _fit_compute(pinned)
    prof.optimizer = _fit_optimizer(pinned)
    colls = _fit_collectives(pinned)
    prof.collectives = {"intra": colls} if colls else {}
    if oversubscribed:
        prof.oversubscription = _oversubscription(pinned, oversubscribed, ranks=over_ranks,
                                                  cores=over_cores)
    walls: dict[str, float] = defaultdict(float)
    for r in list(pinned) + list(oversubscribed or []):
        if r["probe"] == "wall":
            walls[r["what"]] = max(walls[r["what"]], float(r["s"]))
    skipped = {r["what"]: r["reason"] for r in pinned if r["probe"] == "skipped"}
    # How many compute / optimizer figures come from CPU time because another process
    # shared the rank's core through the whole probe (profile.py, _round_robin).
    timed = [r for r in pinned if "timing" in r and r.get("rank", 0) == 0]
    prof.meta = {**dict(meta or {}), "probe_wall_s": dict(walls), "skipped": skipped,
                 "cpu_timed_cases": sum(r["timing"] == "cpu" for r in timed),
                 "timed_cases": len(timed)}
    return prof


# -- human summary ---------------------------------------------------------------------------

def _ms(s: float) -> str:
    return f"{s * 1e3:.2f}"


def summary(prof: Profile) -> str:
    m = prof.model
    lines = [f"profile: model h={m['hidden_size']} i={m['intermediate_size']} "
             f"L={m['num_hidden_layers']} heads={m['num_attention_heads']}/"
             f"{m['num_key_value_heads']} V={m['vocab_size']}, seq_len={prof.seq_len}, "
             f"{prof.compute_dtype}; {prof.machine['cpu_model']}, "
             f"{prof.machine['usable_cores']} cores, torch {prof.machine['torch']}"]

    def fit_line(label: str, fits: Mapping[str, LinearFit]) -> list[str]:
        f, b = fits["fwd"], fits["bwd"]
        pts = "  ".join(f"{int(x)}: {_ms(y)}/{_ms(yb)}" for (x, y), (_, yb)
                        in zip(f.points, b.points, strict=False))
        return [f"  {label:24s} fwd/bwd ms by mbs  {pts}",
                f"  {'':24s} fit fwd {_ms(f.a)} + {_ms(f.b)}*mbs (R2 {f.r2:.4f}, max err "
                f"{f.max_rel_residual:.1%}); bwd {_ms(b.a)} + {_ms(b.b)}*mbs (R2 {b.r2:.4f}, max "
                f"err {b.max_rel_residual:.1%})"]

    lines.append("compute (per decoder block, embedding, head; each rank's median, best rank):")
    for variant, modes in prof.compute.get("block", {}).items():
        for rc, fits in modes.items():
            lines += fit_line(f"block {variant} rc={rc}", fits)
    for part in ("embedding", "head"):
        for variant, fits in prof.compute.get(part, {}).items():
            lines += fit_line(f"{part} {variant}", fits)
    lines.append("optimizer (t = per_step + per_param*numel + per_tensor*tensors):")
    for name, f in prof.optimizer.items():
        lines.append(f"  {name:11s} {f.per_step_s * 1e6:8.1f} us + {f.per_param_s * 1e9:6.3f} "
                     f"ns/param + {f.per_tensor_s * 1e6:6.2f} us/tensor  (R2 {f.r2:.4f}, max err "
                     f"{f.max_rel_residual:.1%})")
    for link, ops in prof.collectives.items():
        lines.append(f"collectives [{link}] (t = alpha + bytes/beta; slowest rank):")
        for op, f in ops.items():
            lines.append(f"  {op:24s} n={f.group_size} alpha {f.alpha_s * 1e6:8.1f} us  beta "
                         f"{f.beta_bytes_per_s / 1e9:6.3f} GB/s  (R2 {f.r2:.4f}, max err "
                         f"{f.max_rel_residual:.1%}, {len(f.points)} sizes "
                         f"{int(f.points[0][0])}..{int(f.points[-1][0])} B)")
    o = prof.oversubscription
    if o:
        pts = ", ".join(f"mbs {int(p[0])}: {_ms(p[1])} -> {_ms(p[2])} ms" for p in o["points"])
        lines.append(f"oversubscription: {o['ranks']} ranks on {o['cores']} cores: compute x"
                     f"{o['compute_factor']:.2f} (measured wall x{o['measured_factor']:.2f}: "
                     f"{pts})")
        for op, f in o["collectives"].items():
            lines.append(f"  {op:24s} n={f.group_size} alpha {f.alpha_s * 1e6:8.1f} us  beta "
                         f"{f.beta_bytes_per_s / 1e9:6.3f} GB/s  (max err {f.max_rel_residual:.1%})")
    other = prof.meta.get("other_cpu_cores")
    if other is not None and other > 0.1:
        lines.append(f"warning: other processes used {other:.2f} cores on average during the "
                     "calibration and slowed its probes; calibrate again on a quiet machine "
                     "for figures to plan with")
    if prof.meta.get("cpu_timed_cases"):
        lines.append(f"note: {prof.meta['cpu_timed_cases']} of {prof.meta['timed_cases']} compute/"
                     "optimizer cases shared their core with another process throughout; their "
                     "figures are thread CPU time")
    for what, why in prof.meta.get("skipped", {}).items():
        lines.append(f"skipped {what}: {why}")
    if "wall_s" in prof.meta:
        worlds = ", ".join(f"{k} {v:.1f} s" for k, v in prof.meta.get("world_wall_s", {}).items())
        quiet = ("" if other is None else
                 f"; other processes: {prof.meta['other_cpu_s']:.1f} CPU s")
        lines.append(f"calibration wall time {prof.meta['wall_s']:.1f} s ({worlds}{quiet})")
    return "\n".join(lines)
