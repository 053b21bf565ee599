"""Node agents as the controller sees them: who joined, who is alive, and a Popen-like handle
for every worker an agent starts (`phalanx.launch.agent` is the other side).

The protocol is signed JSON values under the run-global prefix of the control plane (g-1/),
and nothing else (no pickles, no second port):

    controller          C  {"rdzv_id", "nonce", "nnodes": [MIN, MAX], "nproc",
                            "heartbeat_s", "heartbeat_timeout_s"}       written first
    agent/{n}/status    A  {"boot", "seq", "procs": {id: {"pid", "rank", "rc"}}, "exiting"}
                            at least every heartbeat_s and whenever a worker exits: the
                            agent's heartbeat and its workers' exit codes in one value
    agent/{n}/hello     A  {"boot", "host", "addr", "pid", "nproc", "cores", "rdzv_id"}
    agent/{n}/welcome   C  {"boot", "admitted", "reason" | "nonce"}
    agent/{n}/cmd/{k}   C  {"op": "spawn" | "signal" | "fence" | "exit", "boot", "nonce", ...}

`boot` names one start of an agent and `nonce` one controller: a validly signed command
copied from another run or meant for an earlier start of the agent is ignored (a replay).
A hello that is unsigned or does not verify with the run's token is refused and reported
(event `agent_refused`); so is one for a node already served, with another rendezvous id,
or another --nproc-per-node.

Nodes 0..MIN-1 (`--nnodes MIN:MAX`) hold the layout's ranks (rank r on node r // nproc);
agents of nodes MIN..MAX-1 are spare nodes: idle until a lost node's ranks need a home.
An agent whose status has not changed for fault.heartbeat_timeout_s is lost (event
`node_lost`): every handle of its workers then reports SIGKILL (the agent fences itself
after the same silence), and a fence command waits for it should it ever come back.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phalanx.config import ConfigError
from phalanx.orchestrator.commit import RUN
from phalanx.orchestrator.control_plane import TOKEN_ENV, ControlPlane, open_value

log = logging.getLogger("phalanx.controller")

# Remote workers' ids: (node + 1) * PROC_ID_BASE + n, above any Linux pid (pid_max <= 2**22),
# so an id can never name a process of the controller's machine.
PROC_ID_BASE = 10_000_000
PROC_ID_ENV = "PHALANX_PROC_ID"
POLL_S = 0.05
HELLO_SCAN_S = 0.25


class ClusterError(ConfigError):
    """The cluster does not come together (nodes missing at the rendezvous, agent lost
    before the start): stop before training, with the reason."""


@dataclass(frozen=True)
class ClusterLaunch:
    """A multi-node launch as the controller runs it."""

    min_nodes: int
    max_nodes: int
    nproc: int
    host: str  # the rendezvous host: where agents reach the controller's store
    port: int
    rdzv_id: str | None = None
    local_agent: bool = True  # run node 0's agent beside the controller
    join_timeout_s: float = 300.0


def remote_env(env: dict[str, str]) -> dict[str, str]:
    """What the controller set for a worker, to send to its agent: the keys it changed from
    its own environment, never the token (the agent has its own; the store is readable)."""
    return {k: v for k, v in env.items() if os.environ.get(k) != v and k != TOKEN_ENV}


class RemoteProc:
    """A worker started by a node agent, with the part of subprocess.Popen the controller
    uses: poll(), wait(), send_signal(), terminate(), kill(), pid, returncode. `pid` is the
    run-unique id the worker reports (PHALANX_PROC_ID), `os_pid` its pid on its node.
    `lost` says why, when the node is gone (returncode is then -SIGKILL)."""

    def __init__(self, link: AgentLink | None, pid: int, rank: int, local_rank: int, *,
                 lost: str | None = None) -> None:
        self.link, self.pid, self.rank, self.local_rank = link, pid, rank, local_rank
        self.args = ["phalanx.launch.worker", f"rank {rank}"]
        self.os_pid: int | None = None
        self.lost = lost
        self.returncode: int | None = 1 if lost else None

    @property
    def node(self) -> int | None:
        return self.link.node if self.link is not None else None

    def poll(self) -> int | None:
        if self.returncode is not None or self.link is None:
            return self.returncode
        rc, os_pid = self.link.proc_state(self.pid)
        if os_pid is not None:
            self.os_pid = os_pid
        if rc is None and self.link.lost is not None:
            rc, self.lost = -signal.SIGKILL, self.link.lost
        self.returncode = rc
        return rc

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def _signal(self, sig: int, group: bool) -> None:
        if self.link is not None and self.poll() is None:
            self.link.agents.command(self.link, {"op": "signal", "id": self.pid, "sig": int(sig),
                                                 "group": group})

    def send_signal(self, sig: int) -> None:
        self._signal(sig, False)

    def signal_group(self, sig: int) -> None:
        """The worker's process group (its persister and helpers too)."""
        self._signal(sig, True)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)


class AgentLink:
    """One admitted start of one node's agent."""

    def __init__(self, agents: Agents, node: int, hello: dict[str, Any], raw: bytes,
                 now: float) -> None:
        self.agents, self.node, self.info, self.hello_raw = agents, node, hello, raw
        self.boot = str(hello["boot"])
        self.status: dict[str, Any] = {}
        self.seq: Any = None
        self.seen = now
        self.lost: str | None = None
        self.exited = False
        self.cmd_seq = 0
        self.procs: dict[int, RemoteProc] = {}

    @property
    def host(self) -> str:
        return str(self.info.get("host", "?"))

    def proc_state(self, pid: int) -> tuple[int | None, int | None]:
        with self.agents.lock:
            st = self.status.get("procs", {}).get(str(pid))
        if not isinstance(st, dict):
            return None, None
        rc = st.get("rc")
        return (int(rc) if rc is not None else None), st.get("pid")

    def live(self) -> list[RemoteProc]:
        return [p for p in self.procs.values() if p.poll() is None]

    def alive(self) -> bool:
        return self.lost is None and not self.exited


class Agents(threading.Thread):
    """The controller's side of every node agent. A thread of its own (own store connection)
    admits agents and reads their status every POLL_S; the watch loop reads the result
    through the workers' handles."""

    def __init__(self, launch: ClusterLaunch, *, store: Any, connect: Callable[[], Any],
                 token: str, heartbeat_s: float, heartbeat_timeout_s: float,
                 event: Callable[..., Any], log_dir: Path) -> None:
        super().__init__(daemon=True, name="node-agents")
        self.launch, self.store, self._connect, self.token = launch, store, connect, token
        self.heartbeat_s, self.heartbeat_timeout_s = heartbeat_s, heartbeat_timeout_s
        self.event, self.log_dir = event, log_dir
        self.nonce = secrets.token_hex(8)
        self.lock = threading.RLock()
        self.links: dict[int, AgentLink] = {}
        self._refused: dict[int, bytes] = {}
        self._next_id = 0
        self._halt = threading.Event()
        self.local_agent: subprocess.Popen | None = None
        self.error: str | None = None

    # -- start -----------------------------------------------------------------------------
    def publish(self) -> None:
        """The controller's description, which agents verify first (a wrong token shows here)."""
        la = self.launch
        ControlPlane(self.store, token=self.token, generation=RUN).set("controller", {
            "rdzv_id": la.rdzv_id, "nonce": self.nonce, "nnodes": [la.min_nodes, la.max_nodes],
            "nproc": la.nproc, "heartbeat_s": self.heartbeat_s,
            "heartbeat_timeout_s": self.heartbeat_timeout_s, "pid": os.getpid()})

    def start_local_agent(self) -> None:
        """Node 0's agent, beside the controller (dies with it)."""
        from phalanx.orchestrator.controller import _die_with_parent

        la = self.launch
        argv = [sys.executable, "-m", "phalanx.launch.agent", "--rdzv-endpoint",
                f"{la.host}:{la.port}", "--node-rank", "0", "--nproc-per-node", str(la.nproc),
                "--join-timeout", str(la.join_timeout_s)]
        if la.rdzv_id is not None:
            argv += ["--rdzv-id", la.rdzv_id]
        path = self.log_dir / "agent0.log"
        with open(path, "ab") as out:
            self.local_agent = subprocess.Popen(
                argv, env={**os.environ, TOKEN_ENV: self.token}, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=_die_with_parent)

    def rendezvous(self) -> None:
        """Until nodes 0..MIN-1 have joined (ClusterError after --join-timeout)."""
        la = self.launch
        need = set(range(la.min_nodes))
        t0 = time.monotonic()
        last_note = t0
        while True:
            with self.lock:
                have = {n for n, link in self.links.items() if link.alive()}
            if need <= have:
                return
            now = time.monotonic()
            if self.local_agent is not None and self.local_agent.poll() is not None and 0 not in have:
                raise ClusterError(f"node 0's agent exited with code {self.local_agent.returncode}"
                                   f" before joining; see {self.log_dir / 'agent0.log'}")
            if now - t0 > la.join_timeout_s:
                missing = sorted(need - have)
                raise ClusterError(
                    f"node(s) {missing} of {la.min_nodes} did not join within --join-timeout "
                    f"{la.join_timeout_s:.0f} s: start `phalanx run --nnodes {self._nnodes()} "
                    f"--node-rank R --rdzv-endpoint {la.host}:{la.port}` on each of them, with "
                    "the same --rdzv-id and PHALANX_TOKEN (events.jsonl names refused agents).")
            if now - last_note > 10:
                last_note = now
                log.info("waiting for node(s) %s to join (%d of %d)", sorted(need - have),
                         len(have & need), la.min_nodes)
            time.sleep(0.05)

    def _nnodes(self) -> str:
        la = self.launch
        return str(la.min_nodes) if la.min_nodes == la.max_nodes else \
            f"{la.min_nodes}:{la.max_nodes}"

    def cores(self) -> int:
        """The fewest cores any member node's agent may use."""
        with self.lock:
            return min(int(link.info.get("cores") or 1) for n, link in self.links.items()
                       if n < self.launch.min_nodes)

    # -- the thread --------------------------------------------------------------------------
    def run(self) -> None:
        try:
            store = self._connect()
        except Exception as e:  # noqa: BLE001 - no store: nothing to watch
            self.error = str(e)
            return
        cp = ControlPlane(store, token=self.token, generation=RUN)
        last_scan = 0.0
        while not self._halt.wait(POLL_S):
            try:
                now = time.monotonic()
                if now - last_scan >= HELLO_SCAN_S:
                    last_scan = now
                    self._admit(store, cp)
                self._refresh(store, cp)
            except Exception as e:  # noqa: BLE001 - the store is going away with the run
                log.debug("node agents: %s", e)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=2)

    def _admit(self, store: Any, cp: ControlPlane) -> None:
        la = self.launch
        for n in range(la.max_nodes):
            full = cp._full(f"agent/{n}/hello")
            if not store.check([full]):
                continue
            raw = store.get(full)
            link = self.links.get(n)
            if (link is not None and raw == link.hello_raw) or raw == self._refused.get(n):
                continue
            hello, why = open_value(self.token.encode(), RUN, full, raw)
            if why is not None or not isinstance(hello, dict) or "boot" not in hello:
                self._refuse(n, raw, f"its registration is {why or 'malformed'} (no token, or "
                             "not this run's PHALANX_TOKEN)", _claimed(raw))
                continue
            reason = None
            if hello.get("rdzv_id") != la.rdzv_id:
                reason = (f"its rendezvous id {hello.get('rdzv_id')!r} is not this run's "
                          f"{la.rdzv_id!r}")
            elif hello.get("nproc") not in (None, la.nproc):
                reason = (f"it runs --nproc-per-node {hello.get('nproc')}, the controller "
                          f"{la.nproc}")
            elif link is not None and link.alive():
                reason = (f"node {n} is served by the agent on {link.host} (pid "
                          f"{link.info.get('pid')})")
            if reason is not None:
                self._refuse(n, raw, reason, hello)
                cp.set(f"agent/{n}/welcome", {"boot": hello["boot"], "admitted": False,
                                              "reason": reason})
                continue
            new = AgentLink(self, n, hello, raw, time.monotonic())
            with self.lock:
                self.links[n] = new
            cp.set(f"agent/{n}/welcome", {"boot": new.boot, "admitted": True,
                                          "nonce": self.nonce})
            role = "member" if n < la.min_nodes else "spare"
            self.event("agent_joined", node=n, host=new.host, addr=hello.get("addr"),
                       agent_pid=hello.get("pid"), cores=hello.get("cores"), role=role,
                       rejoin=link is not None)
            log.info("node %d joined: agent on %s (%s)", n, new.host, role)

    def _refuse(self, n: int, raw: bytes, reason: str, claim: dict[str, Any]) -> None:
        self._refused[n] = raw
        log.warning("refused an agent for node %d (%s): %s", n, claim.get("host", "?"), reason)
        self.event("agent_refused", node=n, reason=reason, claimed_host=claim.get("host"),
                   claimed_addr=claim.get("addr"))

    def _refresh(self, store: Any, cp: ControlPlane) -> None:
        with self.lock:
            links = [link for link in self.links.values() if link.alive()]
        if not links:
            return
        keys = [cp._full(f"agent/{link.node}/status") for link in links]
        if store.check(keys):
            raws = store.multi_get(keys)
        else:
            raws = [store.get(k) if store.check([k]) else None for k in keys]
        now = time.monotonic()
        for link, key, raw in zip(links, keys, raws, strict=True):
            st = cp._decode(key, raw) if raw is not None else None
            if isinstance(st, dict) and st.get("boot") == link.boot and st.get("seq") != link.seq:
                with self.lock:
                    link.status, link.seq, link.seen = st, st.get("seq"), now
                if st.get("exiting"):
                    link.exited = True
            elif now - link.seen > self.heartbeat_timeout_s:
                self._lose(link, now, store)

    def _lose(self, link: AgentLink, now: float, store: Any) -> None:
        silent = now - link.seen
        with self.lock:
            link.lost = (f"node {link.node} ({link.host}) is lost: its agent sent no heartbeat "
                         f"for {silent:.1f} s (fault.heartbeat_timeout_s="
                         f"{self.heartbeat_timeout_s:g})")
        running = sorted(p.rank for p in link.procs.values() if p.returncode is None)
        self.event("node_lost", node=link.node, host=link.host, silent_s=round(silent, 3),
                   ranks=running)
        log.warning("%s; its workers (ranks %s) count as killed", link.lost, running)
        # Should the agent come back, its first command kills what it still runs.
        self.command(link, {"op": "fence"}, store=store)

    # -- commands ---------------------------------------------------------------------------
    def command(self, link: AgentLink, body: dict[str, Any], *, store: Any = None) -> None:
        with self.lock:
            k = link.cmd_seq
            link.cmd_seq += 1
        try:
            ControlPlane(store or self.store, token=self.token, generation=RUN).set(
                f"agent/{link.node}/cmd/{k}", {**body, "boot": link.boot, "nonce": self.nonce})
        except Exception as e:  # noqa: BLE001 - store gone: the agent fences itself
            log.warning("could not send %s to node %d: %s", body.get("op"), link.node, e)

    def _place(self, member: Any, prev: Any) -> tuple[AgentLink | None, int, str]:
        """A node for `member`: its previous node if that agent lives (a worker failed, not
        the node), else its planned node, else a spare (idle) node, else any node with a
        free slot."""
        nproc = self.launch.nproc
        with self.lock:
            links = dict(self.links)

        def free_slot(link: AgentLink, prefer: int | None = None) -> int | None:
            used = {p.local_rank for p in link.live()}
            if len(used) >= nproc:
                return None
            if prefer is not None and prefer not in used:
                return prefer
            return min(set(range(nproc)) - used)

        if isinstance(prev, RemoteProc) and prev.link is not None and prev.link.alive():
            slot = free_slot(prev.link, prev.local_rank)
            if slot is not None:
                return prev.link, slot, "its node"
        planned = links.get(member.node)
        if planned is not None and planned.alive():
            slot = free_slot(planned, member.local_rank)
            if slot is not None:
                return planned, slot, "its planned node"
        alive = sorted((link for link in links.values() if link.alive()),
                       key=lambda link: (len(link.live()), link.node < self.launch.min_nodes,
                                         link.node))
        for link in alive:
            slot = free_slot(link)
            if slot is not None:
                return link, slot, "a spare node" if not link.live() else "a node with room"
        return None, -1, (f"no node can take rank {member.rank}: every live agent's "
                          f"{nproc} slot(s) are in use and no spare node has joined (start one "
                          f"with --nnodes {self.launch.min_nodes}:{self.launch.min_nodes + 1}, "
                          "or let the run shrink with fault.replace=false)")

    def spawn(self, member: Any, *, env: dict[str, str], log_path: Path,
              prev: Any = None) -> RemoteProc:
        link, slot, why = self._place(member, prev)
        with self.lock:
            self._next_id += 1
            node = link.node if link is not None else self.launch.max_nodes
            pid = (node + 1) * PROC_ID_BASE + self._next_id
        if link is None:
            log.error("%s", why)
            self.event("worker_unplaced", rank=member.rank, reason=why)
            return RemoteProc(None, pid, member.rank, -1, lost=why)
        proc = RemoteProc(link, pid, member.rank, slot)
        with self.lock:
            link.procs[pid] = proc
        body_env = {**remote_env(env), "LOCAL_RANK": str(slot), PROC_ID_ENV: str(pid)}
        self.command(link, {"op": "spawn", "id": pid, "rank": member.rank, "local_rank": slot,
                            "env": body_env, "log": str(log_path)})
        self.event("worker_placed", rank=member.rank, pid=pid, node=link.node, host=link.host,
                   local_rank=slot, where=why)
        return proc

    # -- end ----------------------------------------------------------------------------------
    def shutdown(self, code: int, *, timeout_s: float = 10.0) -> None:
        """Tell every live agent to end its workers and exit with `code`; wait for them."""
        with self.lock:
            links = [link for link in self.links.values() if link.alive()]
        for link in links:
            self.command(link, {"op": "exit", "code": int(code)})
        deadline = time.monotonic() + timeout_s
        while any(link.alive() for link in links) and time.monotonic() < deadline and \
                self.is_alive():
            time.sleep(POLL_S)
        for link in links:
            self.event("agent_left", node=link.node, host=link.host, clean=link.exited)
        self.stop()
        if self.local_agent is not None:
            try:
                self.local_agent.wait(timeout=max(0.0, deadline - time.monotonic()) + 1)
            except subprocess.TimeoutExpired:
                self.local_agent.kill()
                self.local_agent.wait()

    def describe(self) -> dict[str, Any]:
        with self.lock:
            return {str(n): {"host": link.host, "addr": link.info.get("addr"),
                             "lost": link.lost is not None,
                             "role": "member" if n < self.launch.min_nodes else "spare"}
                    for n, link in sorted(self.links.items())}


def _claimed(raw: bytes) -> dict[str, Any]:
    """What an unverified registration says about itself (for the operator's log only)."""
    try:
        env = json.loads(raw)
        value = json.loads(env["v"]) if isinstance(env, dict) else None
        return {k: str(value[k])[:200] for k in ("host", "addr") if k in value} \
            if isinstance(value, dict) else {}
    except Exception:  # noqa: BLE001 - anything may be there
        return {}
