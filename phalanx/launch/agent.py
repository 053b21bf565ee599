"""Node agent: one per node of a cluster run -- `phalanx agent`, `python -m phalanx.launch.agent`,
or what `phalanx run --nnodes N --node-rank R` becomes on a node that does not host the
controller.

It connects to the controller's store, checks that the controller's values verify with its
token (a wrong PHALANX_TOKEN shows here) and registers; the controller admits or refuses it
(phalanx/orchestrator/agents.py has the protocol). Then it starts the node's workers when
told (`python -m phalanx.launch.worker` with the environment the controller computed, plus
this node's: the token, the controller's address as this node reaches it, the interface
gloo should use), reports their exit codes with its heartbeat, and obeys signal, fence and
exit commands. It trusts only values signed with the run's token and unpickles nothing.

Fencing: when the controller has been unreachable for fault.heartbeat_timeout_s, the agent
SIGKILLs its workers and exits; the controller declares the node lost after the same
silence, so a partitioned node cannot go on writing into a later generation.

Exit codes: 0 (or the code the controller sends) after the run; 2 refused (no token, wrong
token, wrong rendezvous id, node already served); 3 the controller was lost or fenced us.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import fcntl
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

EXIT_REFUSED = 2
EXIT_CONTROLLER_LOST = 3
_SIOCGIFADDR = 0x8915


def local_address(host: str, port: int) -> str | None:
    """This node's address on the route to the controller (no packet is sent)."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            return s.getsockname()[0]
    except OSError:
        return None


def interface_of(addr: str | None) -> str | None:
    """The network interface that holds the IPv4 address `addr` (for GLOO_SOCKET_IFNAME)."""
    if not addr:
        return None
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                res = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
        if socket.inet_ntoa(res[20:24]) == addr:
            return name
    return None


def read_token(token_file: str | None) -> str | None:
    """PHALANX_TOKEN, else the token file (which must not be readable by others)."""
    from phalanx.config import ConfigError
    from phalanx.orchestrator.control_plane import TOKEN_ENV

    if token_file:
        path = Path(token_file).expanduser()
        try:
            if path.stat().st_mode & 0o077:
                raise ConfigError(f"--token-file {path} is readable by others; chmod 600 {path}.")
            token = path.read_text().strip()
        except OSError as e:
            raise ConfigError(f"--token-file {path}: {e.strerror}.") from None
        if not token:
            raise ConfigError(f"--token-file {path} is empty.")
        return token
    return os.environ.get(TOKEN_ENV) or None


class Agent:
    def __init__(self, *, host: str, port: int, node: int, nproc: int | None,
                 token: str | None, rdzv_id: str | None, join_timeout_s: float = 300.0) -> None:
        self.host, self.port, self.node, self.nproc = host, port, node, nproc
        self.token, self.rdzv_id, self.join_timeout_s = token, rdzv_id, join_timeout_s
        self.boot = secrets.token_hex(8)
        self.addr = local_address(host, port)
        self.iface = interface_of(self.addr)
        self.procs: dict[int, dict[str, Any]] = {}
        self._procs_lock = threading.RLock()  # the store thread starts, the watchdog fences
        self._fenced = False
        self._signals = 0

    def say(self, msg: str) -> None:
        print(f"phalanx agent (node {self.node}): {msg}", file=sys.stderr, flush=True)

    def _key(self, key: str) -> str:
        return f"g-1/agent/{self.node}/{key}"

    # -- joining ------------------------------------------------------------------------------
    def run(self) -> int:
        from phalanx.orchestrator.commit import RUN
        from phalanx.orchestrator.control_plane import ControlPlane, connect

        # SIGUSR1 prints every thread's stack (as in a worker), for a stuck agent.
        faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
        deadline = time.monotonic() + self.join_timeout_s
        try:
            store = connect(self.host, self.port, timeout_s=self.join_timeout_s)
        except Exception as e:  # noqa: BLE001 - DistNetworkError, timeouts: all the same here
            self.say(f"could not reach the controller's store at {self.host}:{self.port} within "
                     f"{self.join_timeout_s:.0f} s ({str(e).splitlines()[0][:200]})")
            return EXIT_CONTROLLER_LOST
        hello = {"boot": self.boot, "host": socket.gethostname(), "addr": self.addr,
                 "pid": os.getpid(), "nproc": self.nproc, "rdzv_id": self.rdzv_id,
                 "cores": len(os.sched_getaffinity(0))}
        if not self.token:
            # Unsigned, so that the controller can log who tried to join without the secret.
            store.set(self._key("hello"), json.dumps({"v": json.dumps(hello), "sig": None}))
            self.say("refused: no PHALANX_TOKEN (or --token-file): a cluster run's agents need "
                     "the run's shared secret.")
            return EXIT_REFUSED
        cp = ControlPlane(store, token=self.token, generation=RUN)
        cp.set(f"agent/{self.node}/hello", hello)
        ctl, why = self._signed(store, cp, "controller", deadline)
        if ctl is None:
            self.say(f"refused: {why}")
            return EXIT_REFUSED
        self._seq = 0
        self._write_status(cp, exiting=False)
        if ctl.get("rdzv_id") != self.rdzv_id:
            self.say(f"refused: this agent's --rdzv-id {self.rdzv_id!r} is not the run's "
                     f"{ctl.get('rdzv_id')!r}")
            return EXIT_REFUSED
        welcome = None
        while welcome is None:
            w = cp.get(f"agent/{self.node}/welcome")
            if isinstance(w, dict) and w.get("boot") == self.boot:
                welcome = w
            elif time.monotonic() > deadline:
                self.say(f"the controller did not admit this agent within --join-timeout "
                         f"{self.join_timeout_s:.0f} s (is node {self.node} within --nnodes?)")
                return EXIT_REFUSED
            else:
                time.sleep(0.05)
        if not welcome.get("admitted"):
            self.say(f"refused: {welcome.get('reason')}")
            return EXIT_REFUSED
        self.nonce = welcome["nonce"]
        self.nproc = self.nproc or ctl.get("nproc")
        self.hb_s = float(ctl["heartbeat_s"])
        self.hb_timeout_s = float(ctl["heartbeat_timeout_s"])
        # A connection with short timeouts from now on (the socket's receive timeout is fixed
        # when it connects): a store call on a dead link must not outlast the heartbeat
        # timeout, or the agent cannot fence in time.
        store = connect(self.host, self.port, timeout_s=max(0.5, min(5.0, self.hb_timeout_s / 3)))
        cp = ControlPlane(store, token=self.token, generation=RUN)
        self.say(f"joined the run at {self.host}:{self.port} as node {self.node} "
                 f"({self.addr or '?'}, gloo on {self.iface or 'the default interface'})")
        return self._serve(store, cp)

    def _signed(self, store: Any, cp: Any, key: str, deadline: float) -> tuple[Any, str]:
        """The controller's signed value at `key`; (None, why) when it does not verify with
        this agent's token, or never appears."""
        from phalanx.orchestrator.control_plane import open_value

        full = cp._full(key)
        while time.monotonic() < deadline:
            if store.check([full]):
                value, why = open_value(self.token.encode(), cp.generation, full, store.get(full))
                if why is None:
                    return value, ""
                return None, (f"the controller's values do not verify with this agent's token "
                              f"({why}): its PHALANX_TOKEN is not the controller's")
            time.sleep(0.05)
        return None, f"no controller at {self.host}:{self.port} within --join-timeout"

    # -- serving ------------------------------------------------------------------------------
    def _status(self) -> dict[str, Any]:
        return {str(i): {"pid": p["pid"], "rank": p["rank"], "rc": p["rc"]}
                for i, p in self.procs.items()}

    def _write_status(self, cp: Any, *, exiting: bool) -> None:
        self._seq += 1
        cp.set(f"agent/{self.node}/status", {"boot": self.boot, "seq": self._seq,
                                             "procs": self._status(), "exiting": exiting})

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # The controller stops the run at a step boundary (Slurm signals every task): wait
        # for its exit command; a second signal forces.
        self._signals += 1
        if self._signals == 1:
            self.say(f"{signal.Signals(signum).name}: waiting for the controller to stop the run "
                     "(again to kill this node's workers now)")
        else:
            self._kill_all()
            os._exit(128 + signum)

    def _serve(self, store: Any, cp: Any) -> int:
        """Store traffic runs in a thread of its own; this one only watches that it gets
        through. A store call on a link that went dead need not fail in time: c10d's client
        can sit in recv() while the kernel retransmits (seen here for minutes), so the
        watchdog fences instead of waiting on it."""
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._on_signal)
        self._last_ok = time.monotonic()
        self._exit: int | None = None
        io = threading.Thread(target=self._io, args=(store, cp), daemon=True, name="agent-io")
        io.start()
        while self._exit is None:
            time.sleep(0.05)
            silent = time.monotonic() - self._last_ok
            if self._exit is None and silent > self.hb_timeout_s:
                self.say(f"the controller has been unreachable for {silent:.1f} s: killing this "
                         "node's workers (fenced)")
                self._kill_all()
                # Not a normal exit: the store thread is stuck inside c10d, and tearing the
                # interpreter down under it aborts the process.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(EXIT_CONTROLLER_LOST)
        io.join(timeout=5)
        return self._exit

    def _io(self, store: Any, cp: Any) -> None:
        from phalanx.orchestrator.control_plane import open_value

        k = 0
        last_status = 0.0
        bad: set[tuple[str, bytes]] = set()
        exit_code: int | None = None
        while True:
            try:
                changed = self._reap()
                while exit_code is None:
                    full = cp._full(f"agent/{self.node}/cmd/{k}")
                    if not store.check([full]):
                        break
                    raw = store.get(full)
                    cmd, why = open_value(self.token.encode(), cp.generation, full, raw)
                    if why is not None:
                        # Forged: the controller's guard puts its own value back; wait for it.
                        if (full, raw) not in bad:
                            bad.add((full, raw))
                            self.say(f"ignoring {full} ({why})")
                        break
                    k += 1
                    if cmd.get("boot") != self.boot or cmd.get("nonce") != self.nonce:
                        self.say(f"ignoring {full}: signed for another start of this agent or "
                                 "another run (a replay)")
                        continue
                    exit_code = self._do(cmd)
                    changed = True
                now = time.monotonic()
                if changed or exit_code is not None or now - last_status >= self.hb_s:
                    self._write_status(cp, exiting=exit_code is not None)
                    last_status = now
                self._last_ok = time.monotonic()
            except Exception as e:  # noqa: BLE001 - the watchdog decides when this is fatal
                self.say(f"store: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}")
                time.sleep(0.2)
            if exit_code is not None:
                self._exit = exit_code
                return
            time.sleep(0.02)

    def _reap(self) -> bool:
        changed = False
        with self._procs_lock:
            for p in self.procs.values():
                if p["rc"] is None and p["popen"] is not None and \
                        (rc := p["popen"].poll()) is not None:
                    p["rc"] = rc
                    changed = True
                    self.say(f"worker rank {p['rank']} (pid {p['pid']}) exited with {rc}")
        return changed

    def _do(self, cmd: dict[str, Any]) -> int | None:
        op = cmd.get("op")
        if op == "spawn":
            self._spawn(cmd)
        elif op == "signal":
            with self._procs_lock:
                p = self.procs.get(int(cmd["id"]))
                if p is not None and p["rc"] is None and p["popen"] is not None:
                    self._send(p, int(cmd["sig"]), bool(cmd.get("group")))
        elif op == "fence":
            self.say("fenced by the controller (it declared this node lost): killing the workers")
            self._kill_all()
            return EXIT_CONTROLLER_LOST
        elif op == "exit":
            self._kill_all()  # the controller has ended them already; workers ignore SIGTERM
            return int(cmd.get("code", 0))
        else:
            self.say(f"ignoring unknown command {op!r}")
        return None

    def _spawn(self, cmd: dict[str, Any]) -> None:
        from phalanx.orchestrator.control_plane import TOKEN_ENV
        from phalanx.orchestrator.controller import _die_with_parent

        pid_id, rank = int(cmd["id"]), int(cmd["rank"])
        env = {**os.environ, **{str(k): str(v) for k, v in cmd.get("env", {}).items()},
               TOKEN_ENV: self.token, "MASTER_ADDR": self.host, "MASTER_PORT": str(self.port)}
        if self.iface and not (os.environ.get("GLOO_SOCKET_IFNAME") or
                               cmd.get("env", {}).get("GLOO_SOCKET_IFNAME")):
            env["GLOO_SOCKET_IFNAME"] = self.iface
        log_path = Path(cmd["log"])
        with self._procs_lock:
            if self._fenced:
                return
            try:
                log_path.parent.mkdir(parents=True, exist_ok=True)
                with open(log_path, "ab") as out:
                    popen = subprocess.Popen([sys.executable, "-m", "phalanx.launch.worker"],
                                             env=env, stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             preexec_fn=_die_with_parent)
            except OSError as e:
                self.say(f"could not start worker rank {rank}: {e}")
                self.procs[pid_id] = {"popen": None, "pid": None, "rank": rank, "rc": 127}
                return
            self.procs[pid_id] = {"popen": popen, "pid": popen.pid, "rank": rank, "rc": None}
        self.say(f"started worker rank {rank} (pid {popen.pid}, local rank "
                 f"{cmd.get('local_rank')})")

    @staticmethod
    def _send(p: dict[str, Any], sig: int, group: bool) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(p["pid"], sig)
                if sig == signal.SIGKILL:
                    os.killpg(p["pid"], signal.SIGCONT)  # a frozen worker must wake to die
            else:
                os.kill(p["pid"], sig)

    def _live(self) -> list[dict[str, Any]]:
        return [p for p in self.procs.values() if p["rc"] is None and p["popen"] is not None]

    def _kill_all(self) -> None:
        """SIGKILL every worker's process group and reap them; start nothing after this."""
        with self._procs_lock:
            self._fenced = True
            for p in self._live():
                self._send(p, signal.SIGKILL, True)
            for p in self._live():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p["rc"] = p["popen"].wait(timeout=10)


def parser(prog: str = "phalanx agent") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="The node agent of a phalanx cluster run "
                                "(one per node; `phalanx run --nnodes N --node-rank R` starts "
                                "it on the nodes that do not host the controller).")
    p.add_argument("--rdzv-endpoint", "--rdzv_endpoint", dest="endpoint", required=True,
                   help="HOST:PORT of the controller's store")
    p.add_argument("--node-rank", "--node_rank", dest="node", type=int, required=True)
    p.add_argument("--nproc-per-node", "--nproc_per_node", dest="nproc", type=int,
                   help="workers on this node (default: the controller's)")
    p.add_argument("--rdzv-id", "--rdzv_id", dest="rdzv_id")
    p.add_argument("--token-file", help="the run's secret, mode 600 (default: $PHALANX_TOKEN)")
    p.add_argument("--join-timeout", type=float, default=300.0,
                   help="seconds to wait for the controller (default 300)")
    return p


def main(argv: list[str] | None = None) -> int:
    from phalanx.config import ConfigError
    from phalanx.launch.slurm_env import parse_endpoint

    a = parser().parse_args(argv)
    try:
        host, port = parse_endpoint(a.endpoint)
        if port is None:
            raise ConfigError(f"--rdzv-endpoint {a.endpoint}: the controller's port is needed "
                              "(HOST:PORT).")
        token = read_token(a.token_file)
    except ConfigError as e:
        print(f"phalanx agent: error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    return Agent(host=host, port=port, node=a.node, nproc=a.nproc, token=token,
                 rdzv_id=a.rdzv_id, join_timeout_s=a.join_timeout).run()


if __name__ == "__main__":
    sys.exit(main())
