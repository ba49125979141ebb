"""examples/pretrain_*.sh and pretrain_slurm.sbatch: the command each builds (DRY_RUN=1, fast)
and a real tiny CPU run through each launcher that can run here (slow): the deepspeed launcher
on one node, torchrun, and the sbatch script's torchrun with its c10d rendezvous (srun left out,
SLURM's variables set as sbatch would). The scripts run with a PATH that holds no environment:
they find the repository's .venv themselves. The hostfile script over ssh is checked by its
command only (the deepspeed launcher insists on reaching every hostfile entry over ssh, even a
lone localhost); its --no_ssh form trains in tests/e2e/test_multi_node.py."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from megatron_lcot.parallel import free_port
from tests.conftest import PRETRAIN, REPO_ROOT, TINY_MODEL_FLAGS, read_metrics

EXAMPLES = os.path.join(REPO_ROOT, "examples")
ZERO2 = os.path.join(EXAMPLES, "ds_configs", "zero2.json")


BARE_PATH = "/usr/local/bin:/usr/bin:/bin"  # no .venv/bin: the scripts must find it themselves


def script_env(env: dict, dry_run: bool = False) -> dict:
    """The environment a newcomer's shell gives a script: no virtual environment on PATH, no
    PYTHONPATH, no torch.distributed variables; plus `env` (the test's settings)."""
    full_env = {
        **os.environ,
        "PATH": BARE_PATH,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "DRY_RUN": "1" if dry_run else "0",
        "LCOT_ROOT": REPO_ROOT,
    }
    for name in (
        "PYTHONPATH",
        "VIRTUAL_ENV",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
    ):
        full_env.pop(name, None)
    return {**full_env, **env}


def _run_script(script: str, env: dict, *flags, dry_run: bool, cwd=None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["bash", os.path.join(EXAMPLES, script), *flags],
        env=script_env(env, dry_run),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


SUPERVISOR = ["python", "-m", "megatron_lcot.launcher_supervisor"]


def _command(script: str, env: dict, *flags) -> list:
    """The argv the script would run, split at the entry point: (launcher argv after the
    supervisor, script flags). Every script supervises its launcher and asks the ranks to save
    on a signal."""
    argv = shlex.split(_run_script(script, env, *flags, dry_run=True).stdout)
    split = argv.index(PRETRAIN)
    launcher, flags = argv[:split], argv[split + 1 :]
    assert launcher[:3] == SUPERVISOR and "--exit-signal-handler" in flags
    return launcher[3:], flags


def _flag(flags: list, name: str) -> str:
    return flags[flags.index(name) + 1]


def test_single_node_builds_the_deepspeed_launcher_command():
    launcher, flags = _command(
        "pretrain_single_node.sh", {"GPUS_PER_NODE": "4", "MASTER_PORT": "6001"}, "--zero-stage", "3"
    )
    assert launcher == ["deepspeed", "--num_gpus", "4", "--master_port", "6001"]
    assert _flag(flags, "--deepspeed_config") == ZERO2 and "--deepspeed" in flags
    assert flags[-2:] == ["--zero-stage", "3"] and _flag(flags, "--latent-steps") == "2"


def test_multi_node_reads_nodes_and_master_from_the_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=8\nnode-b slots=8\n\n")
    launcher, flags = _command("pretrain_multi_node.sh", {"HOSTFILE": str(hostfile)})
    assert launcher == [
        "deepspeed",
        "--hostfile",
        str(hostfile),
        "--num_nodes",
        "2",
        "--num_gpus",
        "8",
        "--master_addr",
        "node-a",
        "--master_port",
        "29500",
    ]
    assert _flag(flags, "--deepspeed_config") == ZERO2
    launcher, _ = _command("pretrain_multi_node.sh", {"HOSTFILE": str(hostfile), "NODE_RANK": "1"})
    assert launcher[-3:] == ["--no_ssh", "--node_rank", "1"]


def test_torchrun_builds_a_static_rendezvous_without_deepspeed():
    launcher, flags = _command(
        "pretrain_torchrun.sh",
        {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "head"},
        "--use-distributed-optimizer",
    )
    assert launcher == [
        "torchrun",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--nproc-per-node",
        "8",
        "--master-addr",
        "head",
        "--master-port",
        "29500",
    ]
    assert "--deepspeed" not in flags and flags[-1] == "--use-distributed-optimizer"


def test_slurm_runs_one_torchrun_per_node_with_c10d_rendezvous():
    slurm = {"SLURM_NNODES": "4", "SLURM_JOB_ID": "4242", "MASTER_ADDR": "gpu001"}
    launcher, flags = _command("pretrain_slurm.sbatch", slurm)
    assert launcher == [
        "--after-preemption",
        "scontrol requeue 4242",
        "srun",
        "--kill-on-bad-exit=1",
        *SUPERVISOR,
        "--preempted-status",
        "0",
        "torchrun",
        "--nnodes",
        "4",
        "--nproc-per-node",
        "8",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "gpu001:29500",
        "--rdzv-id",
        "4242",
    ]
    assert "--deepspeed" in flags
    _, plain = _command("pretrain_slurm.sbatch", {**slurm, "USE_DEEPSPEED": "0"})
    assert "--deepspeed" not in plain
    header = open(os.path.join(EXAMPLES, "pretrain_slurm.sbatch")).read()
    assert "#SBATCH --signal=B:USR1@" in header and "#SBATCH --requeue" in header


def test_scripts_name_the_fix_when_no_environment_has_the_launcher(tmp_path):
    """A checkout without .venv and nothing on PATH: the error says how to get the launcher."""
    root = tmp_path / "checkout"
    (root / "examples").mkdir(parents=True)
    for name in ("pretrain_common.sh", "pretrain_torchrun.sh"):
        (root / "examples" / name).write_text(open(os.path.join(EXAMPLES, name)).read())
    result = subprocess.run(
        ["bash", str(root / "examples" / "pretrain_torchrun.sh")],
        env=script_env({}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 127
    assert "not found: run scripts/setup_venv.sh (creates" in result.stderr


def _tiny_env(tmp_path) -> dict:
    return {
        "GPUS_PER_NODE": "2",
        "MASTER_PORT": str(free_port()),
        "MODEL_ARGS": " ".join([*TINY_MODEL_FLAGS, "--latent-steps", "2", "--halting", "adaptive"]),
        "DATA_ARGS": "--mock-data --vocab-size 200",
        "TRAIN_ARGS": f"--micro-batch-size 2 --global-batch-size 8 --train-iters 3 --log-interval 1 "
        f"--eval-iters 1 --metrics-file {tmp_path / 'metrics.jsonl'}",
        "DS_CONFIG": os.path.join(EXAMPLES, "ds_configs", "zero1.json"),
    }


REAL_RUNS = {
    "single_node": ("pretrain_single_node.sh", {}),
    "torchrun": ("pretrain_torchrun.sh", {}),
    "slurm_without_srun": (
        "pretrain_slurm.sbatch",
        {"SRUN": "", "SLURM_NNODES": "1", "SLURM_JOB_ID": "1", "MASTER_ADDR": "127.0.0.1"},
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(REAL_RUNS), ids=list(REAL_RUNS))
def test_script_trains_a_tiny_model_on_two_cpu_ranks(tmp_path, case):
    script, env = REAL_RUNS[case]
    env = {**_tiny_env(tmp_path), **env}
    result = _run_script(script, env, dry_run=False, cwd=tmp_path)  # bare PATH: finds .venv itself
    assert "dp 2 tp 1 pp 1" in result.stdout
    train = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert [r["iteration"] for r in train] == [1, 2, 3] and train[-1]["loss"] < train[0]["loss"]
