"""A generated sbatch script run for real under a single-node Slurm on localhost (opt-in).

PHALANX_SLURM_TEST=1 turns it on (it needs root and Debian's `slurm-wlm` and `munge`:
`apt-get install -y slurm-wlm munge`). The fixture writes a slurm.conf for one node
(this host, 127.0.0.1, private ports), starts munged, slurmctld and slurmd in the
foreground, and stops them (and any job left) at the end. The test submits
`phalanx slurm --submit` for a 1-node CPU run of the default tiny job, requeues it once a
checkpoint is on disk (what Slurm does after a node failure), and checks that the second
start continued the same run directory from that checkpoint. About a minute.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo",
         "scancel")

pytestmark = [
    pytest.mark.skipif(os.environ.get("PHALANX_SLURM_TEST") != "1",
                       reason="real Slurm test: set PHALANX_SLURM_TEST=1 (needs root, slurm-wlm, "
                       "munge)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, cond, timeout: float, logs: list[Path] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {p}\n{p.read_text()[-3000:] if p.exists() else '(none)'}" for p in logs)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def _job_state(env: dict[str, str], job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True,
                         text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


@pytest.fixture
def slurm_cluster():
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"Slurm/munge tools missing ({', '.join(missing)}): "
                    "apt-get install -y slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the local Slurm runs its daemons as root; run as root")
    d = Path(tempfile.mkdtemp(prefix="phx-slurm-", dir="/tmp"))  # short: socket paths
    d.chmod(0o700)
    for sub in ("munge", "state", "spool"):
        (d / sub).mkdir(mode=0o700)
    procs: list[subprocess.Popen] = []
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf")}
    try:
        subprocess.run(["mungekey", "-c", "-k", str(d / "munge/key")], check=True)
        sock = d / "munge/sock"
        procs.append(subprocess.Popen(
            ["munged", "-F", "--force", f"--socket={sock}", f"--key-file={d}/munge/key",
             f"--log-file={d}/munge/log", f"--pid-file={d}/munge/pid",
             f"--seed-file={d}/munge/seed"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        _wait("munged's socket", sock.exists, 20, [d / "munge/log"])
        host = socket.gethostname().split(".")[0]
        (d / "slurm.conf").write_text(f"""\
ClusterName=phx
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={sock},cred_expire=10
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=10
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
        for daemon in ("slurmctld", "slurmd"):
            procs.append(subprocess.Popen([daemon, "-D", "-f", str(d / "slurm.conf")], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))

        def idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                                 text=True)
            return out.stdout.strip() == "idle"

        _wait("the node to be idle", idle, 60, [d / "slurmctld.log", d / "slurmd.log"])
        yield env, d
    finally:
        if len(procs) == 3:  # cancel what is left, so no job step outlives the test
            subprocess.run(["scancel", "--full", "--partition=debug"], env=env,
                           capture_output=True)
            try:
                _wait("jobs to end", lambda: not subprocess.run(
                    ["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip(), 60)
            except AssertionError:
                pass
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(d, ignore_errors=True)


def test_generated_script_runs_and_resumes_after_requeue(slurm_cluster):
    env, d = slurm_cluster
    job_dir = d / "job"
    steps, every = 80, 10
    sub = subprocess.run(
        [sys.executable, "-m", "phalanx", "slurm", "--nodes", "1", "--time", "10:00",
         "--cpus-per-task", str(min(2, os.cpu_count() or 1)), "--job-name", "tiny",
         "--job-dir", str(job_dir), "--python", sys.executable, "--submit",
         f"trainer.steps={steps}", f"checkpoint.disk_every={every}", "logging.console=plain"],
        env=env, capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip()
    assert job.isdigit(), sub.stdout
    run_dir, log = job_dir / f"run-{job}", job_dir / f"slurm-{job}.out"
    logs = [log, d / "slurmctld.log", d / "slurmd.log"]

    # First start: wait for the first committed checkpoint, then requeue the running job.
    _wait("the first checkpoint", lambda: any(run_dir.glob("checkpoints/step_*/manifest.json")),
          180, logs)
    assert _job_state(env, job)["JobState"] == "RUNNING"
    subprocess.run(["scontrol", "requeue", job], env=env, check=True)
    # Slurm holds a requeued job back until its old credential expires (cred_expire above).
    _wait("the job to finish", lambda: _job_state(env, job)["JobState"] in
          ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), 300, logs)
    state = _job_state(env, job)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", (state, text[-4000:])

    # `phalanx run` read SLURM_* by itself, on both starts.
    assert text.count(f"phalanx: Slurm job {job}: node 0 of 1 ") == 2, text[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert summary["resumed_from"] is not None and summary["resumed_from"]["step"] >= every
    assert summary["resumed_from"]["path"].startswith(str(run_dir / "checkpoints"))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == steps - 1 and {m["step"] for m in metrics} == set(range(steps))
    events = [json.loads(line)["event"] for line in (run_dir / "events.jsonl").read_text()
              .splitlines()]
    assert events.count("run_start") == 2 and "resume" in events
    assert not list(job_dir.glob(f"run-{job}-restart*"))  # it had a checkpoint: no fresh dir

    # The control-plane token: made in the job directory, mode 600, never in the script.
    token = job_dir / "token"
    assert token.stat().st_mode & 0o777 == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text())
    assert token.read_text() not in (job_dir / "tiny.sbatch").read_text()
