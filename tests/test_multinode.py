"""Beyond one machine (issue 9): node agents, a cluster run across network namespaces that
loses a host for real, and the control plane's defences against a client without the token.

The hosts are Linux network namespaces joined by veth pairs on a bridge (10.77.0.x): each
has its own interfaces, addresses and ports, so the controller's store, the agents and
gloo talk over a real (virtual) network, and cutting a host's link partitions it. Those
tests need root and `ip netns`; they skip, saying why, where either is missing. The agent
and security tests run anywhere (every "node" on 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import read_jsonl, run_phalanx
from test_elastic import BASE, exactly_once, losses

from phalanx.orchestrator.control_plane import TOKEN_ENV, ControlPlane

pytestmark = pytest.mark.e2e

STEPS = 12
RECIPE = [*BASE, f"trainer.steps={STEPS}", "cluster.threads_per_worker=1"]


def _events(run_dir: Path, name: str | None = None) -> list[dict]:
    path = run_dir / "events.jsonl"
    evs = read_jsonl(path) if path.exists() else []
    return [e for e in evs if name is None or e["event"] == name]


def _wait(cond, timeout: float, what: str, procs: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for name, p in (procs or {}).items():
            assert p.poll() is None, f"{name} exited with {p.returncode} while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _free_port() -> int:
    from phalanx.launch.world import free_port

    return free_port()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same recipe on one machine, 2 data-parallel workers, no failure."""
    d = tmp_path_factory.mktemp("mn_ref") / "ref"
    proc = run_phalanx([*RECIPE, "parallel.dp=2", "--run-dir", str(d)], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((d / "summary.json").read_text())
    s["dir"] = d
    return s


# -- hosts as network namespaces ------------------------------------------------------------------

def _netns_unavailable() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "building hosts as network namespaces needs root (ip netns add)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"phxprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` fails here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Hosts:
    """n hosts (h0..h{n-1}, 10.77.0.1..) on one bridge in a switch namespace."""

    def __init__(self, n: int) -> None:
        tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.switch = f"phx{tag}sw"
        self.names = [f"phx{tag}h{i}" for i in range(n)]
        self.procs: list[subprocess.Popen] = []
        self._ip("netns", "add", self.switch)
        self._ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.switch, "link", "set", "br0", "up")
        for i, ns in enumerate(self.names):
            self._ip("netns", "add", ns)
            self._ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{i}",
                     "netns", self.switch)
            self._ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0")
            self._ip("-n", self.switch, "link", "set", f"p{i}", "up")
            self._ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")
            self._ip("-n", ns, "link", "set", "lo", "up")

    @staticmethod
    def addr(i: int) -> str:
        return f"10.77.0.{i + 1}"

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    def start(self, i: int, args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        with open(log, "wb") as out:
            p = subprocess.Popen(["ip", "netns", "exec", self.names[i], sys.executable, "-m",
                                  "phalanx", "run", *args], stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.procs.append(p)
        return p

    def pids(self, i: int) -> list[int]:
        r = subprocess.run(["ip", "netns", "pids", self.names[i]], capture_output=True, text=True)
        return [int(x) for x in r.stdout.split()]

    def cut(self, i: int) -> None:
        """Take host i off the network: its end of the link goes away."""
        self._ip("-n", self.switch, "link", "del", f"p{i}")

    def kill(self, i: int) -> None:
        """Kill everything running on host i (agent, workers, their helpers)."""
        for pid in self.pids(i):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        for i in range(len(self.names)):
            self.kill(i)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        for ns in [*self.names, self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def hosts():
    why = _netns_unavailable()
    if why:
        pytest.skip(why)
    h = Hosts(3)
    try:
        yield h
    finally:
        h.close()


def _token_env() -> dict[str, str]:
    return {**os.environ, TOKEN_ENV: secrets.token_hex(16)}


HB_TIMEOUT_S = 3.0  # BASE's fault.heartbeat_timeout_s


def _start_controller(hosts: Hosts, flags: list[str], tmp_path: Path, env: dict[str, str],
                      *extra: str) -> subprocess.Popen:
    """Node 0 on h0: the controller, dp=2. Rank 0 sleeps 0.3 s per step, so that a failure
    injected from the test after step 3 lands while steps remain."""
    return hosts.start(0, [*flags, "--node-rank", "0", *RECIPE, "parallel.dp=2", *extra,
                           "fault.slow_s=0.3", "fault.inject=[{rank:0,step:0,kind:slow}]",
                           "--run-dir", str(tmp_path / "run")], tmp_path / "n0.log", env)


def _finished(proc: subprocess.Popen, tmp_path: Path, t_fail: float) -> dict:
    """The run's summary, after checking it ended well and lost node 1 in time."""
    assert proc.wait(timeout=120) == 0, (tmp_path / "n0.log").read_text()[-3000:]
    run_dir = tmp_path / "run"
    s = json.loads((run_dir / "summary.json").read_text())
    s["dir"] = run_dir
    [lost] = _events(run_dir, "node_lost")
    assert lost["node"] == 1 and lost["ranks"] == [1]
    assert lost["time"] - t_fail <= HB_TIMEOUT_S + 1.0, lost  # within the timeout (+ polling)
    assert s["status"] == "ok" and s["steps"] == STEPS
    return s


def test_lost_host_is_replaced_on_a_spare_host_with_no_committed_step_lost(hosts, reference,
                                                                             tmp_path):
    """Three hosts, `--nnodes 2:3`: h0 runs the controller and node 0's agent, h1 node 1, h2
    joins as a spare node. dp=2 across h0 and h1. Cutting h1's link mid-run: the controller
    declares node 1 lost within the heartbeat timeout, rank 1 comes back on h2 from its live
    replica on h0, and the run ends as if nothing had happened; h1's agent, cut off, fences
    its own worker."""
    run_dir, env = tmp_path / "run", _token_env()
    flags = ["--nnodes", "2:3", "--nproc-per-node", "1", "--rdzv-id", "mn1",
             "--rdzv-endpoint", f"{hosts.addr(0)}:29500"]
    procs = {f"node {i}": hosts.start(i, [*flags, "--node-rank", str(i)], tmp_path / f"n{i}.log",
                                      env) for i in (1, 2)}
    procs["controller"] = _start_controller(hosts, flags, tmp_path, env)
    _wait(lambda: _steps(run_dir) >= 3 and any(e["node"] == 2 for e in _events(
        run_dir, "agent_joined")), 120, "3 steps and the spare node", procs)
    t_cut = time.time()
    hosts.cut(1)
    s = _finished(procs["controller"], tmp_path, t_cut)
    [rec] = s["recoveries"]
    assert rec["kind"] == "replica" and rec["steps_lost"] == 0 and rec["lost_ranks"] == [1]
    assert [f["kind"] for f in s["failures"]] in (["node_lost"], ["heartbeat_timeout"])
    placed = [e for e in _events(run_dir, "worker_placed") if e["rank"] == 1]
    assert [e["node"] for e in placed] == [1, 2] and placed[1]["where"] == "a spare node"
    assert s["replicas_agree"] is True
    assert s["state_digests"] == reference["state_digests"]  # bit-identical to no failure
    assert losses(s) == losses(reference)
    exactly_once(s)
    assert s["nodes"]["1"]["lost"] and s["nodes"]["2"]["role"] == "spare"
    # The cut-off host fenced itself: its agent killed its worker and exited (code 3).
    assert procs["node 1"].wait(timeout=30) == 3
    _wait(lambda: not hosts.pids(1), 15, "h1 to hold no process")
    assert "fenced" in (tmp_path / "n1.log").read_text()
    assert procs["node 2"].wait(timeout=30) == 0


def test_killed_host_shrinks_the_run_with_no_committed_step_lost(hosts, reference, tmp_path):
    """Two hosts, fault.replace=false: everything on h1 (agent and worker) is killed; the
    controller notices the agent's silence and the survivor goes on alone with the same
    global batch (twice the micro-batches)."""
    run_dir, env = tmp_path / "run", _token_env()
    flags = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-id", "mn2",
             "--rdzv-endpoint", f"{hosts.addr(0)}:29500"]
    procs = {"node 1": hosts.start(1, [*flags, "--node-rank", "1"], tmp_path / "n1.log", env)}
    procs["controller"] = _start_controller(hosts, flags, tmp_path, env, "fault.replace=false")
    _wait(lambda: _steps(run_dir) >= 3, 120, "3 steps", procs)
    t_kill = time.time()
    hosts.kill(1)
    s = _finished(procs["controller"], tmp_path, t_kill)
    [rec] = s["recoveries"]
    assert rec["kind"] == "shrink" and rec["steps_lost"] == 0
    worlds = [e["world_size"] for e in _events(run_dir, "generation")]
    assert worlds == [2, 1] and s["world_size"] == 1
    exactly_once(s)
    # Same global batches, another reduction order: equal within float tolerance.
    assert losses(s) == pytest.approx(losses(reference), rel=1e-5)


# -- the agent and its handles, on loopback -------------------------------------------------------

def test_agent_runs_signals_and_fences_workers_for_the_controller(tmp_path):
    """The controller's side (Agents, RemoteProc) against a real `phalanx agent` process: a
    spawned worker gets the node's environment, a remote SIGKILL comes back as its exit
    code, a validly signed command replayed with another controller's nonce is ignored, and
    a frozen agent is declared lost (its workers' handles report SIGKILL); once thawed it
    reads the fence order, kills its worker and exits 3."""
    from phalanx.orchestrator.agents import Agents, ClusterLaunch, RemoteProc
    from phalanx.orchestrator.guard import StoreGuard
    from phalanx.orchestrator.plan import Member

    token = secrets.token_hex(16)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    port = store.port
    events: list[tuple[str, dict]] = []
    guard = StoreGuard(token, lambda key, how: events.append(("forged", {"key": key})))

    def connect():
        return guard.wrap(dist.TCPStore("127.0.0.1", port, is_master=False))

    la = ClusterLaunch(min_nodes=1, max_nodes=1, nproc=2, host="127.0.0.1", port=port,
                       rdzv_id="u1", join_timeout_s=60)
    agents = Agents(la, store=guard.wrap(store), connect=connect, token=token, heartbeat_s=0.3,
                    heartbeat_timeout_s=2.0, event=lambda n, **kw: events.append((n, kw)),
                    log_dir=tmp_path)
    agents.publish()
    agents.start()
    log = open(tmp_path / "agent.log", "wb")
    agent = subprocess.Popen([sys.executable, "-m", "phalanx", "agent", "--rdzv-endpoint",
                              f"127.0.0.1:{port}", "--node-rank", "0", "--rdzv-id", "u1"],
                             env={**os.environ, TOKEN_ENV: token}, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    procs: list[RemoteProc] = []
    try:
        agents.rendezvous()
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), TOKEN_ENV: token, "PHALANX_RUN_DIR": str(tmp_path)}
        # A worker waits for the recipe that never comes: alive until told otherwise.
        procs = [agents.spawn(Member(rank=r, node=0, local_rank=r), env=env,
                              log_path=tmp_path / f"w{r}.log") for r in (0, 1)]
        _wait(lambda: all(p.os_pid for p in procs if p.poll() is None), 30, "the agent's report")
        environ = dict(kv.split("=", 1) for kv in
                       Path(f"/proc/{procs[0].os_pid}/environ").read_text().split("\0") if "=" in kv)
        assert environ["PHALANX_PROC_ID"] == str(procs[0].pid) and procs[0].pid > 2**22
        assert environ[TOKEN_ENV] == token and environ["LOCAL_RANK"] == "0"
        assert (environ["MASTER_ADDR"], environ["GLOO_SOCKET_IFNAME"]) == ("127.0.0.1", "lo")
        link = procs[0].link
        replay = {"op": "fence", "boot": link.boot, "nonce": "another-controller"}
        ControlPlane(store, token=token, generation=-1).set(f"agent/0/cmd/{link.cmd_seq}", replay)
        link.cmd_seq += 1
        procs[0].send_signal(signal.SIGKILL)
        assert procs[0].wait(timeout=15) == -signal.SIGKILL
        assert procs[1].poll() is None and agent.poll() is None  # the replay fenced nothing
        os.kill(agent.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        assert procs[1].wait(timeout=10) == -signal.SIGKILL and "node 0" in procs[1].lost
        assert 1.5 <= time.monotonic() - t0 < 5.0
        assert [kw["node"] for n, kw in events if n == "node_lost"] == [0]
        os.kill(agent.pid, signal.SIGCONT)
        assert agent.wait(timeout=20) == 3
        assert not Path(f"/proc/{procs[1].os_pid}").exists()
        text = (tmp_path / "agent.log").read_text()
        assert "(a replay)" in text and "fenced" in text
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(agent.pid, signal.SIGCONT)
            os.killpg(agent.pid, signal.SIGKILL)
        agent.wait(timeout=10)
        for p in procs:
            if p.os_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.os_pid, signal.SIGKILL)
        agents.stop()
        log.close()


def test_agents_without_the_token_are_refused_and_forged_keys_change_nothing(reference,
                                                                              tmp_path):
    """A cluster run on loopback (2 nodes of 1 worker, room for 2 spare nodes). Besides node
    1's real agent, an agent with a wrong token tries to join as node 2 and one with none as
    node 3: both exit with code 2 and each is an `agent_refused` event. A raw TCPStore
    client (no token) forges node 1's first two commands ahead of the controller, a future
    commit, and -- once training runs -- overwrites `current` and the plan: nobody acts on
    them, the controller reports each one and puts its own value back, and the run ends
    bit-identical to a failure-free one."""
    run_dir, env = tmp_path / "run", _token_env()
    port = _free_port()
    flags = ["--nnodes", "2:4", "--nproc-per-node", "1", "--rdzv-id", "sec",
             "--rdzv-endpoint", f"127.0.0.1:{port}"]
    logs = {n: open(tmp_path / f"{n}.log", "wb") for n in ("controller", "node1")}
    started: list[subprocess.Popen] = []

    def start(args, name=None, e=env, **kw):
        p = subprocess.Popen([sys.executable, "-m", "phalanx", *args], env=e,
                             stdout=logs[name] if name else subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True, **kw)
        started.append(p)
        return p

    try:
        ctl = start(["run", *flags, "--node-rank", "0", *RECIPE, "parallel.dp=2",
                     "--run-dir", str(run_dir)], "controller")
        raw = dist.TCPStore("127.0.0.1", port, is_master=False)  # waits for the store
        _wait(lambda: raw.check(["g-1/controller"]), 60, "the controller's store")
        forged = json.dumps({"v": json.dumps({"op": "fence", "generation": 9}),
                             "sig": "00" * 32})
        raw.set("g-1/agent/1/cmd/0", forged)  # node 1's first command, before the controller
        raw.set("g-1/agent/1/cmd/1", forged)  # its second, which its agent reads after the first
        raw.set("g0/commit/9", forged)        # a commit the controller has not written yet
        start(["run", *flags, "--node-rank", "1"], "node1")
        wrong = start(["run", *flags, "--node-rank", "2"], e={**env, TOKEN_ENV: "not-it"},
                      text=True)
        none = start(["run", *flags, "--node-rank", "3"],
                     e={k: v for k, v in env.items() if k != TOKEN_ENV}, text=True)
        out_wrong, _ = wrong.communicate(timeout=60)
        out_none, _ = none.communicate(timeout=60)
        assert wrong.returncode == 2 and "its PHALANX_TOKEN is not the controller's" in out_wrong
        assert none.returncode == 2 and "refused: no PHALANX_TOKEN" in out_none
        _wait(lambda: _steps(run_dir) >= 2, 120, "training", {"controller": ctl})
        raw.set("g-1/current", forged)
        raw.set("g0/plan", forged)
        assert ctl.wait(timeout=120) == 0, (tmp_path / "controller.log").read_text()[-3000:]
    finally:
        for p in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        for f in logs.values():
            f.close()
    s = json.loads((run_dir / "summary.json").read_text())
    s["dir"] = run_dir
    assert s["status"] == "ok" and s["steps"] == STEPS and not s["failures"]
    assert s["state_digests"] == reference["state_digests"]
    assert losses(s) == losses(reference)
    refused = _events(run_dir, "agent_refused")
    assert sorted(e["node"] for e in refused) == [2, 3]
    assert all("not this run's PHALANX_TOKEN" in e["reason"] for e in refused)
    forged_keys = {(e["key"], e["how"]) for e in _events(run_dir, "control_plane_forged")}
    assert forged_keys == {("g-1/agent/1/cmd/0", "written before the controller wrote it"),
                           ("g-1/agent/1/cmd/1", "written before the controller wrote it"),
                           ("g0/commit/9", "written before the controller wrote it"),
                           ("g-1/current", "overwritten"), ("g0/plan", "overwritten")}
    assert "ignoring g-1/agent/1/cmd/1 (bad signature)" in (tmp_path / "node1.log").read_text()


def test_buddy_copies_live_on_another_node():
    """checkpoint.peer_every keeps each rank's snapshot in its buddy's memory: with the
    workers' ranks_per_node (cluster.devices_per_node), the buddy is on another node, so a
    lost node never takes a snapshot and its only copy."""
    from phalanx.checkpoint.manager import buddy_of

    for nodes, per_node, stage_block in ((2, 1, 1), (2, 4, 2), (3, 2, 1), (4, 8, 8)):
        world = nodes * per_node
        buddies = [buddy_of(r, world, ranks_per_node=per_node, ranks_per_stage=stage_block)
                   for r in range(world)]
        assert sorted(buddies) == list(range(world))
        assert all(b // per_node != r // per_node for r, b in enumerate(buddies)), buddies


def test_a_recipe_for_more_nodes_than_launched_is_refused():
    from phalanx.config import ConfigError, validate
    from phalanx.launch.cli import _cluster_launch, _launcher_overrides, compose_recipe

    run = compose_recipe(["cluster.nodes=2"])
    _launcher_overrides([], env={})
    with pytest.raises(ConfigError, match=r"cluster.nodes=2, but this is a single-node launch"):
        _cluster_launch(validate(run))
