"""Slurm: hostlists and SLURM_*/torchrun environments parsed, `phalanx run` wired to them, and
`phalanx slurm` scripts against golden files (PHALANX_UPDATE_GOLDEN=1 rewrites them)."""

from __future__ import annotations

import difflib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from phalanx.config import ConfigError
from phalanx.launch import slurm
from phalanx.launch.cli import _launcher_overrides
from phalanx.launch.slurm_env import (
    LaunchEnvError,
    expand_hostlist,
    parse_endpoint,
    parse_nnodes,
    parse_tasks_per_node,
    resolve_launch,
    slurm_env,
    torchrun_env,
)

GOLDEN = Path(__file__).parent / "golden" / "slurm"

# -- real-looking environments --------------------------------------------------------------------
# Recorded from Slurm 22.05 (Debian's slurm-wlm) on a one-node cluster: an sbatch script's own
# environment, and the environment of the task that `srun` started from it.
BATCH_1NODE = {
    "SLURMD_NODENAME": "vm", "SLURM_CLUSTER_NAME": "phx", "SLURM_CPUS_ON_NODE": "2",
    "SLURM_CPUS_PER_TASK": "2", "SLURM_GTIDS": "0", "SLURM_JOBID": "1",
    "SLURM_JOB_CPUS_PER_NODE": "2", "SLURM_JOB_ID": "1", "SLURM_JOB_NAME": "env.sbatch",
    "SLURM_JOB_NODELIST": "vm", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_PARTITION": "debug",
    "SLURM_LOCALID": "0", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_NODELIST": "vm",
    "SLURM_NPROCS": "1", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0",
    "SLURM_SUBMIT_DIR": "/work/main", "SLURM_SUBMIT_HOST": "vm", "SLURM_TASKS_PER_NODE": "1",
    "SLURM_TASK_PID": "29568", "SLURM_TOPOLOGY_ADDR": "vm",
}
STEP_1NODE = {
    **BATCH_1NODE, "SLURM_DISTRIBUTION": "cyclic", "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1",
    "SLURM_SRUN_COMM_HOST": "127.0.0.1", "SLURM_SRUN_COMM_PORT": "41681", "SLURM_STEPID": "0",
    "SLURM_STEP_ID": "0", "SLURM_STEP_LAUNCHER_PORT": "41681", "SLURM_STEP_NODELIST": "vm",
    "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_TASKS_PER_NODE": "1",
    "SLURM_TASK_PID": "29587", "SLURM_UMASK": "0022",
}
# `srun --ntasks=2` on that node: task 1 (recorded).
STEP_2TASKS_TASK1 = {
    **STEP_1NODE, "SLURM_LOCALID": "1", "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
    "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2",
}
# A 4-node GPU job as the generated script runs it: the batch script on the first node, and
# the srun task on the third node (same variables as recorded above, a multi-node job's values).
GPU_JOB = {
    "SLURM_JOB_ID": "4817503", "SLURM_JOBID": "4817503", "SLURM_JOB_NAME": "llama7b",
    "SLURM_JOB_NODELIST": "gpu-a[01-03],gpu-b07", "SLURM_NODELIST": "gpu-a[01-03],gpu-b07",
    "SLURM_JOB_NUM_NODES": "4", "SLURM_NNODES": "4", "SLURM_NTASKS": "4",
    "SLURM_NTASKS_PER_NODE": "1", "SLURM_TASKS_PER_NODE": "1(x4)", "SLURM_CPUS_PER_TASK": "64",
    "SLURM_GPUS_ON_NODE": "8", "SLURM_GPUS_PER_NODE": "8", "SLURM_JOB_PARTITION": "gpu",
    "SLURM_RESTART_COUNT": "1", "SLURM_SUBMIT_HOST": "login1",
}
GPU_BATCH = {**GPU_JOB, "SLURMD_NODENAME": "gpu-a01", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
GPU_STEP_NODE2 = {
    **GPU_JOB, "SLURMD_NODENAME": "gpu-a03", "SLURM_NODEID": "2", "SLURM_PROCID": "2",
    "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0",
    "SLURM_STEP_NODELIST": "gpu-a[01-03],gpu-b07", "SLURM_STEP_NUM_NODES": "4",
    "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "1(x4)",
}
# A torchrun user's habit: `srun --ntasks-per-node=8` -- 8 launchers per node.
GPU_STEP_8_PER_NODE = {**GPU_STEP_NODE2, "SLURM_STEP_TASKS_PER_NODE": "8(x4)",
                       "SLURM_STEP_NUM_TASKS": "32", "SLURM_LOCALID": "3", "SLURM_PROCID": "19"}
# An older Slurm: only the short names.
OLD_STYLE = {"SLURM_JOBID": "77", "SLURM_NODELIST": "cn[098-101]", "SLURM_NNODES": "4",
             "SLURM_NODEID": "3", "SLURM_TASKS_PER_NODE": "2(x3),1"}


# -- hostlists ------------------------------------------------------------------------------------
# Expected values are `scontrol show hostnames` output (Slurm 22.05); test_hostlist_matches_
# scontrol re-checks them wherever scontrol is installed.
HOSTLISTS = {
    "node[01-04,07]": ["node01", "node02", "node03", "node04", "node07"],
    "gpu-a[1-2],gpu-b3": ["gpu-a1", "gpu-a2", "gpu-b3"],
    "rack[1-2]-n[01-02]": ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"],
    "n[1-2]-[3-4]": ["n1-3", "n1-4", "n2-3", "n2-4"],
    "n[8-11]": ["n8", "n9", "n10", "n11"],
    "n[09-11]": ["n09", "n10", "n11"],
    "n[001-3]": ["n001", "n002", "n003"],
    "n[1-010]": [f"n{i}" for i in range(1, 11)],
    "x1,y[2-3],z": ["x1", "y2", "y3", "z"],
    "10.0.0.[1-3]": ["10.0.0.1", "10.0.0.2", "10.0.0.3"],
    "n[5]": ["n5"],
    "vm": ["vm"],
    "n1 n2": ["n1", "n2"],
}


@pytest.mark.parametrize("text", list(HOSTLISTS))
def test_hostlist_expansion(text):
    assert expand_hostlist(text) == HOSTLISTS[text]


@pytest.mark.parametrize("text,message", [
    ("n[3-1]", "runs backwards"), ("n[a-b]", "neither a number nor a LO-HI range"),
    ("n[]", "neither a number"), ("n[1-2", "'[' without ']'"), ("n1-2]", "']' without '['"),
    ("n[[1-2]]", "brackets do not nest"), ("n[0-99999999]", "over 65536 hosts"),
])
def test_bad_hostlists_are_named(text, message):
    with pytest.raises(LaunchEnvError, match=message.replace("[", r"\[").replace("(", r"\(")):
        expand_hostlist(text)


def test_hostlist_matches_scontrol(tmp_path):
    if shutil.which("scontrol") is None:
        pytest.skip("scontrol is not installed (apt-get install slurm-wlm)")
    conf = tmp_path / "slurm.conf"  # scontrol wants a configuration even for offline commands
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\n"
                    "PartitionName=p Nodes=localhost\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for text, hosts in HOSTLISTS.items():
        out = subprocess.run(["scontrol", "show", "hostnames", text], env=env, capture_output=True,
                             text=True, timeout=10)
        assert out.stdout.split() == hosts == expand_hostlist(text), (text, out.stderr)


def test_tasks_per_node():
    assert parse_tasks_per_node("8(x4)") == [8, 8, 8, 8]
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("1") == [1]
    with pytest.raises(LaunchEnvError, match="not N or N"):
        parse_tasks_per_node("8(4)")


# -- SLURM_* --------------------------------------------------------------------------------------

def test_outside_slurm_is_none():
    assert slurm_env({"HOME": "/root", "MASTER_ADDR": "h"}) is None


def test_recorded_batch_and_step_environments():
    b = slurm_env(BATCH_1NODE)
    assert (b.job_id, b.nodes, b.node_rank, b.nnodes, b.rdzv_host) == ("1", ("vm",), 0, 1, "vm")
    assert not b.in_step and b.tasks_per_node == (1,) and b.cpus_per_task == 2
    s = slurm_env(STEP_1NODE)
    assert s.in_step and s.sources["nodes"] == "SLURM_STEP_NODELIST" and s.ntasks == 1
    assert s.job_name == "env.sbatch" and s.restart_count == 0 and s.gpus_on_node is None


def test_gpu_job_on_its_third_node():
    s = slurm_env(GPU_STEP_NODE2)
    assert s.nodes == ("gpu-a01", "gpu-a02", "gpu-a03", "gpu-b07")
    assert (s.node_rank, s.nnodes, s.rdzv_host, s.job_id) == (2, 4, "gpu-a01", "4817503")
    assert s.nodes[s.node_rank] == GPU_STEP_NODE2["SLURMD_NODENAME"]
    assert (s.proc_id, s.local_id, s.gpus_on_node, s.restart_count) == (2, 0, 8, 1)
    assert s.tasks_per_node == (1, 1, 1, 1) and s.tasks_on_this_node == 1
    assert s.job_name == "llama7b" and s.cpus_per_task == 64
    b = slurm_env(GPU_BATCH)
    assert (b.node_rank, b.nnodes, b.in_step, b.sources["nodes"]) == (0, 4, False,
                                                                       "SLURM_JOB_NODELIST")


def test_old_style_names():
    s = slurm_env(OLD_STYLE)
    assert s.job_id == "77" and s.nodes == ("cn098", "cn099", "cn100", "cn101")
    assert s.node_rank == 3 and s.tasks_per_node == (2, 2, 2, 1) and s.tasks_on_this_node == 1


def test_node_rank_from_slurmd_nodename_when_nodeid_is_missing():
    env = {k: v for k, v in GPU_STEP_NODE2.items() if k != "SLURM_NODEID"}
    assert slurm_env(env).node_rank == 2
    env.pop("SLURMD_NODENAME")
    with pytest.raises(LaunchEnvError, match="SLURM_NODEID is not set.*srun"):
        slurm_env(env)


@pytest.mark.parametrize("change,message", [
    ({"SLURM_JOB_NUM_NODES": "3"}, "SLURM_JOB_NUM_NODES=3 but SLURM_JOB_NODELIST"),
    ({"SLURM_NODEID": "4"}, "SLURM_NODEID=4 is outside the job's 4 nodes"),
    ({"SLURM_NODEID": "two"}, "SLURM_NODEID='two' is not an integer"),
    ({"SLURM_JOB_NODELIST": "", "SLURM_NODELIST": ""}, "SLURM_JOB_NODELIST is not"),
    ({"SLURM_JOB_NODELIST": "gpu[1-2", "SLURM_NODELIST": ""}, "'\\[' without '\\]'"),
])
def test_inconsistent_slurm_environment(change, message):
    with pytest.raises(LaunchEnvError, match=message):
        slurm_env({**GPU_BATCH, **change})


# -- torchrun's environment and the merge -------------------------------------------------------

def test_torchrun_environment():
    t = torchrun_env({"MASTER_ADDR": "10.1.0.5", "MASTER_PORT": "29500", "NNODES": "2",
                      "NODE_RANK": "1", "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1",
                      "LOCAL_WORLD_SIZE": "8"})
    assert (t.master_addr, t.master_port, t.nnodes, t.node_rank) == ("10.1.0.5", 29500, "2", 1)
    assert (t.rank, t.world_size, t.local_rank, t.local_world_size) == (9, 16, 1, 8)
    # torchrun's own PET_* variables win over the plain ones; GROUP_RANK is a node rank.
    t = torchrun_env({"PET_NNODES": "1:4", "NNODES": "2", "GROUP_RANK": "3",
                      "PET_RDZV_ENDPOINT": "h:29400", "TORCHELASTIC_RUN_ID": "j1"})
    assert (t.nnodes, t.sources["nnodes"], t.node_rank, t.sources["node_rank"]) == \
        ("1:4", "PET_NNODES", 3, "GROUP_RANK")
    assert t.rdzv_endpoint == "h:29400" and t.rdzv_id == "j1"


def test_endpoint_and_nnodes_forms():
    assert parse_endpoint("gpu-a01:29500") == ("gpu-a01", 29500)
    assert parse_endpoint("[fe80::1]:29500") == ("fe80::1", 29500)
    assert parse_endpoint("gpu-a01") == ("gpu-a01", None)
    with pytest.raises(LaunchEnvError, match="outside 1..65535"):
        parse_endpoint("h:70000")
    with pytest.raises(LaunchEnvError, match="expected HOST:PORT"):
        parse_endpoint("h:p")
    assert parse_nnodes("4") == (4, 4) and parse_nnodes("2:4") == (2, 4)
    for bad in ("0", "4:2", "x"):
        with pytest.raises(LaunchEnvError):
            parse_nnodes(bad)


def test_launch_from_slurm_alone():
    spec = resolve_launch(env=STEP_1NODE)
    assert (spec.min_nodes, spec.max_nodes, spec.node_rank, spec.host, spec.rdzv_id) == \
        (1, 1, 0, "vm", "1")
    assert spec.port == 0 and not spec.multi_node
    multi = resolve_launch(env=GPU_STEP_NODE2)
    assert (multi.max_nodes, multi.node_rank, multi.host) == (4, 2, "gpu-a01")
    assert multi.multi_node and multi.describe_nodes() == "4 nodes (from SLURM_STEP_NODELIST)"


def test_flags_beat_torchrun_env_beats_slurm():
    env = {**GPU_STEP_NODE2, "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "29511", "NNODES": "3"}
    spec = resolve_launch(env=env)
    assert (spec.max_nodes, spec.sources["nnodes"]) == (3, "NNODES")
    assert (spec.host, spec.port, spec.node_rank) == ("10.0.0.9", 29511, 2)
    spec = resolve_launch(nnodes="4", node_rank=1, rdzv_endpoint="gpu-b07:29600",
                          rdzv_id="mine", env=env)
    assert (spec.max_nodes, spec.node_rank, spec.host, spec.port, spec.rdzv_id) == \
        (4, 1, "gpu-b07", 29600, "mine")
    assert spec.sources["host"] == spec.sources["port"] == "--rdzv-endpoint"
    # --standalone: one node, the environment ignored.
    spec = resolve_launch(standalone=True, env=env)
    assert spec.max_nodes is None and spec.port == 0 and spec.slurm is None


def test_launch_errors():
    with pytest.raises(LaunchEnvError, match="node rank 2 .* outside the 1 nodes"):
        resolve_launch(nnodes="1", env=GPU_STEP_NODE2)
    with pytest.raises(LaunchEnvError, match="8 tasks on this node.*--ntasks-per-node=1"):
        resolve_launch(env=GPU_STEP_8_PER_NODE)
    with pytest.raises(LaunchEnvError, match="Slurm started 2 tasks on this node"):
        resolve_launch(env=STEP_2TASKS_TASK1)
    with pytest.raises(LaunchEnvError, match="--standalone is a single-node launch"):
        resolve_launch(nnodes="2", standalone=True)
    # The batch script itself (not a step) of a job with several tasks per node is one process.
    assert resolve_launch(env={**BATCH_1NODE, "SLURM_TASKS_PER_NODE": "2",
                               "SLURM_NTASKS_PER_NODE": "2"}).max_nodes == 1


# -- `phalanx run` reads it -----------------------------------------------------------------------

def test_run_inside_one_node_allocation_reads_slurm():
    argv, port = _launcher_overrides(["trainer.steps=3"], env={**STEP_1NODE, "MASTER_PORT": "29512"})
    assert argv == ["trainer.steps=3", "cluster.nodes=1"] and port == 29512
    argv, port = _launcher_overrides(["--rdzv-endpoint", "vm:29600", "--rdzv-id", "1",
                                      "--nnodes", "1", "--nproc-per-node", "2"], env=STEP_1NODE)
    assert argv == ["cluster.devices_per_node=2", "cluster.nodes=1"] and port == 29600


def test_run_on_more_than_one_node_needs_the_endpoint_and_the_token():
    from phalanx.launch.agent import Agent
    from phalanx.launch.cli import _cluster_role, _LaunchArgs

    # --nnodes MIN:MAX lays the recipe out on MIN nodes; the others are spare nodes.
    assert _launcher_overrides(["--nnodes", "4"])[0] == ["cluster.nodes=4"]
    assert _launcher_overrides(["--nnodes", "2:4"])[0] == ["cluster.nodes=2"]
    for env, argv in ((GPU_STEP_NODE2, []), ({}, ["--nnodes", "2"]),
                      ({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "h"}, [])):
        _launcher_overrides(argv, env=env)
        with pytest.raises(ConfigError, match=r"give its address: --rdzv-endpoint HOST:PORT"):
            _cluster_role([])
    ep = ["--nnodes", "2", "--rdzv-endpoint", "10.0.0.1:29400", "--rdzv-id", "j1"]
    _launcher_overrides([*ep, "--node-rank", "0"], env={})
    with pytest.raises(ConfigError, match=r"needs a shared secret .* PHALANX_TOKEN"):
        _cluster_role([])
    # Node 1 becomes its node's agent (it is refused by the controller without the token).
    _launcher_overrides([*ep, "--node-rank", "1", "--nproc-per-node", "4"], env={})
    agent = _cluster_role([])
    assert isinstance(agent, Agent) and not _LaunchArgs.hosts_controller
    assert (agent.host, agent.port, agent.node, agent.nproc, agent.rdzv_id) == \
        ("10.0.0.1", 29400, 1, 4, "j1")
    _launcher_overrides([*ep, "--node-rank", "1", "--controller", "10.0.0.7:29999"], env={})
    assert (_cluster_role([]).host, _cluster_role([]).port) == ("10.0.0.7", 29999)
    with pytest.raises(ConfigError, match="--multirun runs one job after another"):
        _cluster_role(["--multirun"])


def test_phalanx_run_in_a_multinode_allocation_exits_with_the_reason(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "PET_"))},
           **GPU_STEP_NODE2}
    out = subprocess.run([sys.executable, "-m", "phalanx", "run", "--run-dir",
                          str(tmp_path / "run")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    assert "phalanx: error: 4 nodes (from SLURM_STEP_NODELIST): the nodes meet at the " \
           "controller's store, so give its address: --rdzv-endpoint HOST:PORT" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()


# -- `phalanx slurm` ------------------------------------------------------------------------------

REQUESTS = {
    # 4 x 8 GPUs on a partition and account.
    "gpu_4x8": ["--nodes", "4", "--gpus-per-node", "8", "--time", "24:00:00", "--partition", "gpu",
                "--account", "proj42", "--job-name", "llama7b", "--job-dir",
                "/scratch/phalanx/llama7b", "model=llama_7b", "cluster=h100_8x", "precision=bf16"],
    # One CPU-only node, the default tiny job.
    "cpu_1node": ["--nodes", "1", "--time", "00:30:00", "--job-name", "tiny-cpu", "--job-dir",
                  "/home/alice/phalanx/tiny", "trainer.steps=50"],
    # 16 nodes; a given token file and port; overrides with spaces and both kinds of quote.
    "gpu_16_quoted": ["--nodes", "16", "--gpus-per-node", "8", "--time", "2-00:00:00",
                      "--partition", "batch", "--job-name", "sweep", "--job-dir",
                      "/lustre/proj/runs/sweep", "--token-file", "/etc/phalanx/team.token",
                      "--port", "29500", "--sbatch-option=--qos=high",
                      "--python", "/opt/phalanx venv/bin/python", "data=files",
                      "data.path=/datasets/my corpus/train.txt",
                      "logging.wandb_project=\"it's a 'run'\"",
                      "checkpoint.dir=/lustre/proj/ckpt dir", "checkpoint.disk_every=500",
                      "model=llama_70b", "cluster=h100_8x"],
}


def _render(name: str, capsys) -> tuple[int, str, str]:
    rc = slurm.main(REQUESTS[name])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("name", list(REQUESTS))
def test_script_matches_golden_file(name, capsys):
    rc, script, err = _render(name, capsys)
    assert rc == 0, err
    path = GOLDEN / f"{name}.sbatch"
    if os.environ.get("PHALANX_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
    want = path.read_text()
    if script != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), script.splitlines(True),
                                            f"golden/slurm/{name}.sbatch", "phalanx slurm now"))
        pytest.fail(f"`phalanx slurm` output differs from {path} (rerun with "
                    f"PHALANX_UPDATE_GOLDEN=1 if the change is intended):\n{diff}")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_overrides_reach_phalanx_run_verbatim(capsys):
    """Let bash itself read the script's override lines back: the quoting round-trips."""
    _, script, _ = _render("gpu_16_quoted", capsys)
    lines = script.splitlines()
    start = next(i for i, line in enumerate(lines) if '"${RESUME[@]}"' in line) + 1
    words = " ".join(line.rstrip("\\").strip() for line in lines[start:])
    out = subprocess.run(["bash", "-c", f"printf '%s\\0' {words}"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.split("\0")[:-1] == REQUESTS["gpu_16_quoted"][-7:]
    assert "'/opt/phalanx venv/bin/python' -m phalanx run" in script


def test_submit_needs_sbatch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    rc = slurm.main(["--job-dir", str(tmp_path / "job"), "--submit"])
    err = capsys.readouterr().err
    assert rc == 2 and "--submit needs Slurm's `sbatch` on PATH" in err
    assert not (tmp_path / "job").exists()


def test_out_writes_the_script_and_a_private_job_dir(tmp_path, capsys):
    rc = slurm.main(["--job-dir", str(tmp_path / "job"), "--out", str(tmp_path / "x.sbatch"),
                     "trainer.steps=5"])
    assert rc == 0 and "wrote" in capsys.readouterr().err
    assert (tmp_path / "x.sbatch").read_text().startswith("#!/bin/bash\n")
    assert (tmp_path / "job").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("argv,message", [
    (["nodes=3"], "nodes comes from --nodes in a Slurm job"),
    (["cluster.devices_per_node=4"], "from --nproc-per-node / --gpus-per-node"),
    (["--time", "25h"], "--time 25h: Slurm wants"),
    (["--job-name", "my job"], "--job-name 'my job'"),
    (["--job-dir", "/a b"], "#SBATCH --output cannot quote"),
    (["--gpus-per-node", "4", "--nproc-per-node", "8"], "one worker per GPU"),
    (["trainer.stpes=3"], "the overrides do not compose: Could not override 'trainer.stpes'"),
    (["model=huge"], "Could not find 'model/huge'"),
    (["trainer.steps=5\ntouch /tmp/x"], "a line break cannot go into a batch script line"),
])
def test_bad_requests_are_refused(argv, message, capsys):
    assert slurm.main(["--job-dir", "/tmp/phx-unused", *argv]) == 2
    assert message in capsys.readouterr().err


def test_token_file_readable_by_others_is_refused(tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("3f9a1c0e5b7d2468")
    token.chmod(0o644)
    assert slurm.main(["--job-dir", str(tmp_path), "--token-file", str(token)]) == 2
    assert "readable by others; chmod 600" in capsys.readouterr().err
    token.chmod(0o600)
    assert slurm.main(["--job-dir", str(tmp_path), "--token-file", str(token)]) == 0
    assert "3f9a1c0e5b7d2468" not in capsys.readouterr().out
