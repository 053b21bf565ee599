"""Where is this launcher running? Slurm's and torchrun's environment, parsed.

`phalanx run` is one launcher per node (it starts the node's workers itself). Inside a
Slurm allocation it learns the node list, its node rank and the job id from `SLURM_*`;
under a user's torchrun-style script from `MASTER_ADDR`/`MASTER_PORT`/`NNODES`/
`NODE_RANK` and torchrun's own `PET_*` variables. `resolve_launch` merges those with the
command line's flags: a flag wins over the torchrun environment, which wins over Slurm's.

Slurm's hostlist syntax (`scontrol show hostnames` is the reference): hosts separated by
commas (or whitespace); a host may hold bracketed ranges, each a comma list of `N` or
`LO-HI`; several brackets in one host multiply (`rack[1-2]-n[01-02]` is four hosts); a
range keeps the zero padding of its low end (`n[08-10]` -> n08 n09 n10).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from phalanx.config import ConfigError

T = TypeVar("T")

# A hostlist that expands to more hosts than this is a typo, not a cluster.
MAX_HOSTS = 65536


class LaunchEnvError(ConfigError):
    """The environment or the launcher flags describe a launch that cannot work."""


# -- hostlists ----------------------------------------------------------------------------------

def _split_top(text: str) -> list[str]:
    """Split on commas / whitespace outside brackets."""
    out, cur, depth = [], [], 0
    for ch in text:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise LaunchEnvError(f"hostlist {text!r}: nested '[' (brackets do not nest).")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchEnvError(f"hostlist {text!r}: ']' without '['.")
        if depth == 0 and (ch == "," or ch.isspace()):
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise LaunchEnvError(f"hostlist {text!r}: '[' without ']'.")
    out.append("".join(cur))
    return [h for h in out if h]


def _expand_ranges(body: str, text: str) -> list[str]:
    values: list[str] = []
    for part in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m:
            raise LaunchEnvError(f"hostlist {text!r}: [{body}] holds {part!r}, which is neither "
                                 "a number nor a LO-HI range.")
        lo_s, hi_s = m.group(1), m.group(2)
        if hi_s is None:
            values.append(lo_s)
            continue
        lo, hi = int(lo_s), int(hi_s)
        if lo > hi:
            raise LaunchEnvError(f"hostlist {text!r}: range {part!r} runs backwards.")
        if hi - lo >= MAX_HOSTS:
            raise LaunchEnvError(f"hostlist {text!r}: range {part!r} is over {MAX_HOSTS} hosts.")
        width = len(lo_s)  # Slurm pads every number to its low end's width
        values.extend(str(i).zfill(width) for i in range(lo, hi + 1))
    return values


def expand_hostlist(text: str) -> list[str]:
    """`node[01-04,07],gpu-b3` -> ['node01', 'node02', 'node03', 'node04', 'node07', 'gpu-b3']."""
    hosts: list[str] = []
    for item in _split_top(text.strip()):
        # Alternate literal text and bracket bodies: "rack", "1-2", "-n", "01-02", "".
        pieces = re.split(r"\[([^\]]*)\]", item)
        choices = [[p] if i % 2 == 0 else _expand_ranges(p, text) for i, p in enumerate(pieces)]
        n = 1
        for c in choices:
            n *= len(c)
        if len(hosts) + n > MAX_HOSTS:
            raise LaunchEnvError(f"hostlist {text!r} expands to over {MAX_HOSTS} hosts.")
        hosts.extend("".join(parts) for parts in itertools.product(*choices))
    return hosts


def parse_tasks_per_node(text: str) -> list[int]:
    """Slurm's compressed counts: `8(x4),2` -> [8, 8, 8, 8, 2]."""
    out: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise LaunchEnvError(f"tasks per node {text!r}: {part!r} is not N or N(xM).")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


# -- Slurm ----------------------------------------------------------------------------------------

def _int(env: Mapping[str, str], *names: str) -> tuple[int | None, str | None]:
    """The first of `names` that is set, as an int, and its name."""
    for name in names:
        raw = env.get(name, "").strip()
        if raw:
            try:
                return int(raw), name
            except ValueError:
                raise LaunchEnvError(f"{name}={raw!r} is not an integer.") from None
    return None, None


@dataclass(frozen=True)
class SlurmEnv:
    """One task's view of its Slurm job (a step's view when it runs under srun)."""

    job_id: str
    nodes: tuple[str, ...]
    node_rank: int
    job_name: str | None = None
    proc_id: int | None = None  # SLURM_PROCID: global task rank
    local_id: int | None = None  # SLURM_LOCALID: task rank on this node
    ntasks: int | None = None
    tasks_per_node: tuple[int, ...] | None = None
    gpus_on_node: int | None = None
    cpus_per_task: int | None = None
    restart_count: int = 0
    in_step: bool = False  # under srun (a job step), not the batch script itself
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def nnodes(self) -> int:
        return len(self.nodes)

    @property
    def rdzv_host(self) -> str:
        """The first node: where the rendezvous (and node 0's controller) lives."""
        return self.nodes[0]

    @property
    def tasks_on_this_node(self) -> int | None:
        if self.tasks_per_node is None or self.node_rank >= len(self.tasks_per_node):
            return None
        return self.tasks_per_node[self.node_rank]


def slurm_env(env: Mapping[str, str]) -> SlurmEnv | None:
    """Parse `SLURM_*`; None outside a Slurm job (no SLURM_JOB_ID / SLURM_JOBID)."""
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        return None
    in_step = bool(env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID"))
    src: dict[str, str] = {}
    # Under srun, SLURM_NODEID counts within the step's nodes, which may be a subset.
    names = (("SLURM_STEP_NODELIST",) if in_step else ()) + ("SLURM_JOB_NODELIST", "SLURM_NODELIST")
    nodelist_name = next((n for n in names if env.get(n)), None)
    if nodelist_name is None:
        raise LaunchEnvError(f"SLURM_JOB_ID={job_id} is set but SLURM_JOB_NODELIST is not: this "
                             "does not look like a Slurm allocation (unset SLURM_JOB_ID, or run "
                             "inside sbatch/salloc/srun).")
    nodes = tuple(expand_hostlist(env[nodelist_name]))
    if not nodes:
        raise LaunchEnvError(f"{nodelist_name}={env[nodelist_name]!r} names no nodes.")
    src["nodes"] = nodelist_name
    count_names = (("SLURM_STEP_NUM_NODES",) if nodelist_name == "SLURM_STEP_NODELIST"
                   else ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"))
    count, count_name = _int(env, *count_names)
    if count is not None and count != len(nodes):
        raise LaunchEnvError(f"{count_name}={count} but {nodelist_name}={env[nodelist_name]!r} "
                             f"names {len(nodes)} nodes.")
    node_rank, rank_name = _int(env, "SLURM_NODEID")
    if node_rank is None and env.get("SLURMD_NODENAME") in nodes:
        node_rank, rank_name = nodes.index(env["SLURMD_NODENAME"]), "SLURMD_NODENAME"
    if node_rank is None:
        if len(nodes) > 1:
            raise LaunchEnvError(f"a {len(nodes)}-node Slurm job, but SLURM_NODEID is not set, so "
                                 "this node's rank is unknown: start phalanx with srun.")
        node_rank, rank_name = 0, nodelist_name
    if not 0 <= node_rank < len(nodes):
        raise LaunchEnvError(f"{rank_name}={node_rank} is outside the job's {len(nodes)} nodes.")
    src["node_rank"] = rank_name or ""
    tpn_raw = env.get("SLURM_STEP_TASKS_PER_NODE") if in_step else None
    tpn_raw = tpn_raw or env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    tasks_per_node = tuple(parse_tasks_per_node(tpn_raw)) if tpn_raw else None
    if tasks_per_node is not None and len(tasks_per_node) == 1 and len(nodes) > 1:
        tasks_per_node = tasks_per_node * len(nodes)  # SLURM_NTASKS_PER_NODE=8: 8 on every node
    restart, _ = _int(env, "SLURM_RESTART_COUNT")
    return SlurmEnv(
        job_id=job_id, nodes=nodes, node_rank=node_rank, job_name=env.get("SLURM_JOB_NAME"),
        proc_id=_int(env, "SLURM_PROCID")[0], local_id=_int(env, "SLURM_LOCALID")[0],
        ntasks=_int(env, "SLURM_STEP_NUM_TASKS" if in_step else "SLURM_NTASKS", "SLURM_NTASKS")[0],
        tasks_per_node=tasks_per_node, gpus_on_node=_int(env, "SLURM_GPUS_ON_NODE")[0],
        cpus_per_task=_int(env, "SLURM_CPUS_PER_TASK")[0], restart_count=restart or 0,
        in_step=in_step, sources=src)


# -- torchrun -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TorchrunEnv:
    """torchrun's launcher variables (`PET_*`, which torchrun itself reads for its flags) and
    the variables users' scripts export for it (`MASTER_ADDR`, `NNODES`, `NODE_RANK`, ...);
    the worker-side ones (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `GROUP_RANK`) are kept too."""

    master_addr: str | None = None
    master_port: int | None = None
    nnodes: str | None = None  # "N" or "MIN:MAX"
    node_rank: int | None = None
    nproc_per_node: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    rank: int | None = None
    world_size: int | None = None
    local_rank: int | None = None
    local_world_size: int | None = None
    sources: dict[str, str] = field(default_factory=dict, compare=False)


def torchrun_env(env: Mapping[str, str]) -> TorchrunEnv:
    src: dict[str, str] = {}

    def text(key: str, *names: str) -> str | None:
        for n in names:
            if env.get(n, "").strip():
                src[key] = n
                return env[n].strip()
        return None

    def num(key: str, *names: str) -> int | None:
        value, name = _int(env, *names)
        if name:
            src[key] = name
        return value

    return TorchrunEnv(
        master_addr=text("master_addr", "PET_MASTER_ADDR", "MASTER_ADDR"),
        master_port=num("master_port", "PET_MASTER_PORT", "MASTER_PORT"),
        nnodes=text("nnodes", "PET_NNODES", "NNODES", "GROUP_WORLD_SIZE"),
        node_rank=num("node_rank", "PET_NODE_RANK", "NODE_RANK", "GROUP_RANK"),
        nproc_per_node=num("nproc_per_node", "PET_NPROC_PER_NODE"),
        rdzv_endpoint=text("rdzv_endpoint", "PET_RDZV_ENDPOINT"),
        rdzv_id=text("rdzv_id", "PET_RDZV_ID", "TORCHELASTIC_RUN_ID"),
        rank=num("rank", "RANK"), world_size=num("world_size", "WORLD_SIZE"),
        local_rank=num("local_rank", "LOCAL_RANK"),
        local_world_size=num("local_world_size", "LOCAL_WORLD_SIZE"), sources=src)


# -- merged -------------------------------------------------------------------------------------

def parse_nnodes(text: str, *, what: str = "--nnodes") -> tuple[int, int]:
    """`4` -> (4, 4); `2:4` -> (2, 4) (torchrun's elastic MIN:MAX)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", text)
    if not m:
        raise LaunchEnvError(f"{what} {text}: not a number of nodes (N, or MIN:MAX).")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) is not None else lo
    if lo < 1 or hi < lo:
        raise LaunchEnvError(f"{what} {text}: node counts must satisfy 1 <= MIN <= MAX.")
    return lo, hi


def parse_endpoint(text: str, *, what: str = "--rdzv-endpoint") -> tuple[str, int | None]:
    """`host:29500`, `[fe80::1]:29500` or `host` -> (host, port or None)."""
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", text.strip())
    if not m:
        raise LaunchEnvError(f"{what} {text}: expected HOST:PORT.")
    host = m.group(1) or m.group(3)
    port_s = m.group(2) or m.group(4)
    port = int(port_s) if port_s else None
    if port is not None and not 0 < port < 65536:
        raise LaunchEnvError(f"{what} {text}: port {port} is outside 1..65535.")
    return host, port


@dataclass(frozen=True)
class LaunchSpec:
    """Where this launcher sits in the job, and where the job meets."""

    min_nodes: int | None = None  # None: nobody said (one node)
    max_nodes: int | None = None
    node_rank: int = 0
    host: str | None = None  # rendezvous host (node 0)
    port: int = 0  # 0: any free port (single node)
    rdzv_id: str | None = None
    nproc_per_node: int | None = None
    slurm: SlurmEnv | None = None
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def multi_node(self) -> bool:
        return (self.max_nodes or 1) > 1

    def describe_nodes(self) -> str:
        n = (str(self.max_nodes) if self.min_nodes == self.max_nodes
             else f"{self.min_nodes}:{self.max_nodes}")
        return f"{n} nodes (from {self.sources.get('nnodes', '--nnodes')})"


def resolve_launch(*, nnodes: str | None = None, node_rank: int | None = None,
                   rdzv_endpoint: str | None = None, rdzv_id: str | None = None,
                   master_addr: str | None = None, master_port: int | None = None,
                   nproc_per_node: int | None = None, standalone: bool = False,
                   env: Mapping[str, str] | None = None) -> LaunchSpec:
    """Merge flags (first), the torchrun environment, then Slurm's. `env=None` reads flags
    only; `standalone` ignores the environment (one node, any free port)."""
    env = {} if env is None or standalone else env
    tr = torchrun_env(env)
    sl = slurm_env(env)
    src: dict[str, str] = {}

    def pick(key: str, *cands: tuple[T | None, str]) -> T | None:
        for value, name in cands:
            if value is not None:
                src[key] = name
                return value
        return None

    nn = pick("nnodes", (nnodes, "--nnodes"), (tr.nnodes, tr.sources.get("nnodes", "")),
              (str(sl.nnodes) if sl else None, sl.sources["nodes"] if sl else ""))
    lo, hi = parse_nnodes(str(nn), what=src["nnodes"]) if nn is not None else (None, None)
    if standalone and (hi or 1) > 1:
        raise LaunchEnvError(f"--standalone is a single-node launch, but --nnodes {nnodes}.")

    ep_host, ep_port = parse_endpoint(rdzv_endpoint) if rdzv_endpoint else (None, None)
    env_ep = (parse_endpoint(tr.rdzv_endpoint, what="PET_RDZV_ENDPOINT") if tr.rdzv_endpoint
              else (None, None))
    host = pick("host", (ep_host, "--rdzv-endpoint"), (master_addr, "--master-addr"),
                (env_ep[0], "PET_RDZV_ENDPOINT"),
                (tr.master_addr, tr.sources.get("master_addr", "")),
                (sl.rdzv_host if sl else None, sl.sources["nodes"] if sl else ""))
    port = pick("port", (ep_port, "--rdzv-endpoint"), (master_port, "--master-port"),
                (env_ep[1], "PET_RDZV_ENDPOINT"),
                (tr.master_port, tr.sources.get("master_port", "")))
    rank = pick("node_rank", (node_rank, "--node-rank"),
                (tr.node_rank, tr.sources.get("node_rank", "")),
                (sl.node_rank if sl else None, sl.sources["node_rank"] if sl else ""))
    rid = pick("rdzv_id", (rdzv_id, "--rdzv-id"), (tr.rdzv_id, tr.sources.get("rdzv_id", "")),
               (sl.job_id if sl else None, "SLURM_JOB_ID"))
    nproc = pick("nproc_per_node", (nproc_per_node, "--nproc-per-node"),
                 (tr.nproc_per_node, "PET_NPROC_PER_NODE"))

    rank = rank or 0
    if rank < 0 or (hi is not None and rank >= hi):
        raise LaunchEnvError(f"node rank {rank} (from {src['node_rank']}) is outside the "
                             f"{hi or 1} nodes of the launch (from {src.get('nnodes', 'default')}).")
    if sl is not None and sl.in_step and (sl.tasks_on_this_node or 1) > 1:
        raise LaunchEnvError(f"Slurm started {sl.tasks_on_this_node} tasks on this node, and each "
                             "would be a phalanx launcher: run one per node (srun "
                             "--ntasks-per-node=1); it starts --nproc-per-node workers itself.")
    if port is not None and not 0 <= port < 65536:
        raise LaunchEnvError(f"port {port} (from {src['port']}) is outside 0..65535.")
    return LaunchSpec(min_nodes=lo, max_nodes=hi, node_rank=rank, host=host, port=port or 0,
                      rdzv_id=rid, nproc_per_node=nproc, slurm=sl, sources=src)
