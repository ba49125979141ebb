"""Preemption as a scheduler delivers it: a signal sent to the launch script's own process (the
job's main process, which Kubernetes, SLURM's `--signal=B:...` and a terminal signal), with
the script's real launcher underneath: the deepspeed runner (SIGTERM), torchrun (SIGTERM) and
the sbatch script without srun (SIGUSR1, then its requeue command). Each run: 2 CPU ranks,
DeepSpeed ZeRO-1, a tiny adaptive model. Checked: the script exits 128 + the signal's number
("interrupted, resumable") without a traceback,
within the launchers' 30 s grace; every rank saved the same iteration; no process of the job
outlives the script; the same command relaunched resumes and ends bit-identical (every
metrics record, the final weights) to one uninterrupted run. Also (fast): the supervisor ends
what a launcher leaves behind, and --exit-duration-in-mins counts from the process's start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from megatron_lcot.parallel import free_port
from tests.conftest import PRETRAIN, TINY_MODEL_FLAGS, read_checkpoint_weights, read_metrics
from tests.e2e.test_launch_scripts import EXAMPLES, script_env

TRAIN_ITERS = 12
ZERO1 = os.path.join(EXAMPLES, "ds_configs", "zero1.json")
LAUNCHER_GRACE_SECONDS = 30  # torchrun's and deepspeed launch.py's SIGTERM-to-SIGKILL delay, SLURM's KillWait


def _env(tmp_path, name: str) -> dict:
    """Settings of one run: tiny adaptive model, 2 ranks, checkpoints in tmp_path/name (saved
    only at the end or on a signal, loaded when present), metrics in tmp_path/name.jsonl."""
    run_dir = tmp_path / name
    return {
        "GPUS_PER_NODE": "2",
        "MASTER_PORT": str(free_port()),
        "DS_CONFIG": ZERO1,
        "MODEL_ARGS": " ".join([*TINY_MODEL_FLAGS, "--latent-steps", "2", "--halting", "adaptive"]),
        "DATA_ARGS": "--mock-data --vocab-size 200",
        "TRAIN_ARGS": f"--micro-batch-size 2 --global-batch-size 8 --train-iters {TRAIN_ITERS} --lr 3e-3 "
        f"--log-interval 1 --eval-iters 1 --eval-interval 1000 "
        f"--save {run_dir} --load {run_dir} "
        f"--metrics-file {tmp_path / f'{name}.jsonl'}",
    }


# case: (script, extra settings, flags, signal the scheduler sends)
CASES = {
    "deepspeed_runner_sigterm": ("pretrain_single_node.sh", {}, [], signal.SIGTERM),
    "torchrun_sigterm": (
        "pretrain_torchrun.sh",
        {},
        ["--deepspeed", "--deepspeed_config", ZERO1],
        signal.SIGTERM,
    ),
    "sbatch_usr1": (
        "pretrain_slurm.sbatch",
        {"SRUN": "", "SLURM_NNODES": "1", "SLURM_JOB_ID": "7", "MASTER_ADDR": "127.0.0.1"},
        [],
        signal.SIGUSR1,
    ),
}


def _start(script: str, env: dict, flags: list, log) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", os.path.join(EXAMPLES, script), *flags],
        env=script_env(env),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _deterministic(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("tokens_per_sec", "elapsed_s", "eta_s")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """One straight run to TRAIN_ITERS through the deepspeed runner: metrics and final weights."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    with open(tmp_path / "out.log", "w") as log:
        assert _start("pretrain_single_node.sh", _env(tmp_path, "run"), [], log).wait(timeout=600) == 0, (
            tmp_path / "out.log"
        ).read_text()[-3000:]
    return {
        "metrics": [_deterministic(r) for r in read_metrics(tmp_path / "run.jsonl")],
        "weights": read_checkpoint_weights(tmp_path / "run" / f"iter_{TRAIN_ITERS:07d}", tmp_path),
    }


def _job_processes(script: subprocess.Popen) -> tuple:
    """(every process below the script, the ranks among them) once both ranks run."""
    for _ in range(600):
        below = psutil.Process(script.pid).children(recursive=True)
        ranks = []
        for process in below:
            try:
                if PRETRAIN in process.cmdline() and "LOCAL_RANK" in process.environ():
                    ranks.append(process)
            except psutil.NoSuchProcess:
                pass
        if len(ranks) == 2:
            return below, ranks
        time.sleep(0.5)
    raise AssertionError("the two ranks never started")


def _wait_for_iteration(metrics, iteration: int, script: subprocess.Popen, log) -> None:
    for _ in range(1200):
        assert script.poll() is None, log.read_text()[-3000:]
        if metrics.exists() and any(r["iteration"] >= iteration for r in read_metrics(metrics)):
            return
        time.sleep(0.25)
    raise AssertionError(f"iteration {iteration} never logged")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_signal_to_the_launch_script_saves_every_rank_and_resumes_exactly(tmp_path, case, uninterrupted):
    script, settings, flags, signum = CASES[case]
    requeued = tmp_path / "requeued"
    env = {**_env(tmp_path, "run"), **settings, "REQUEUE": f"touch {requeued}"}
    log_path = tmp_path / "stopped.log"
    with open(log_path, "w") as log:
        job = _start(script, env, flags, log)
        try:
            below, ranks = _job_processes(job)
            _wait_for_iteration(tmp_path / "run.jsonl", 2, job, log_path)
            sent = time.monotonic()
            os.kill(job.pid, signum)
            status = job.wait(timeout=300)
            seconds = time.monotonic() - sent
        finally:
            job.kill()
    out = log_path.read_text()
    print(f"{case}: {signal.Signals(signum).name} to the script -> exit {status} after {seconds:.1f} s")
    assert status == 128 + signum and "Traceback" not in out, out[-3000:]
    assert "launcher_supervisor: the launcher exited with status 0" in out
    assert seconds < LAUNCHER_GRACE_SECONDS
    survivors = [p.pid for p in below if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not survivors, f"outlived the launch script: {survivors}"

    stopped_at = int((tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= stopped_at < TRAIN_ITERS
    assert f"exiting at iteration {stopped_at}: an exit signal (SIGTERM or SIGUSR1) reached a rank" in out
    assert sorted(os.listdir(tmp_path / "run")) == [
        f"iter_{stopped_at:07d}",
        "latest_checkpointed_iteration.txt",
    ]
    saved = {name for _, _, names in os.walk(tmp_path / "run") for name in names}
    assert {f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in range(len(ranks))} <= saved
    assert max(r["iteration"] for r in read_metrics(tmp_path / "run.jsonl")) == stopped_at
    assert requeued.exists() == (case == "sbatch_usr1")

    resumed = subprocess.run(
        ["bash", os.path.join(EXAMPLES, script), *flags],
        env=script_env(env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at iteration {stopped_at}" in resumed.stdout
    assert [_deterministic(r) for r in read_metrics(tmp_path / "run.jsonl")] == uninterrupted["metrics"]
    weights = read_checkpoint_weights(tmp_path / "run" / f"iter_{TRAIN_ITERS:07d}", tmp_path)
    assert weights.keys() == uninterrupted["weights"].keys()
    assert all(torch.equal(tensor, uninterrupted["weights"][name]) for name, tensor in weights.items())


LEAVES_AN_ORPHAN = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(0.5)
os._exit(0)  # as the deepspeed runner dies at SIGTERM: its child is orphaned, alive
"""


def test_the_supervisor_ends_what_the_launcher_leaves_behind(tmp_path):
    """A launcher that exits leaving a process behind (reparented to the supervisor, the child
    subreaper): the supervisor terminates it, says so and returns the launcher's status."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_lcot.launcher_supervisor",
            "--leftover-grace-seconds",
            "5",
            sys.executable,
            "-c",
            LEAVES_AN_ORPHAN,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=script_env({"PYTHONPATH": os.path.dirname(EXAMPLES)}),
    )
    orphan = int(result.stdout.split()[0])
    assert result.returncode == 0, result.stderr
    assert f"the launcher exited, leaving [{orphan}]: SIGTERM" in result.stderr
    assert not psutil.pid_exists(orphan)


def test_exit_duration_counts_from_the_process_start(tmp_path, capsys):
    """A process older than --exit-duration-in-mins stops after its first step, although the
    loop itself ran for milliseconds (Megatron-LM counts from the process's start)."""
    import pretrain_lcot

    age = time.time() - psutil.Process().create_time()
    time.sleep(max(0.0, 10 - age))  # old enough that the first step cannot take as long
    minutes = (time.time() - psutil.Process().create_time()) / 60 / 2
    flags = [
        *TINY_MODEL_FLAGS,
        "--mock-data",
        "--vocab-size",
        "256",
        "--micro-batch-size",
        "2",
        "--train-iters",
        "6",
        "--eval-iters",
        "1",
        "--save",
        str(tmp_path / "run"),
        "--exit-duration-in-mins",
        str(minutes),
    ]
    assert pretrain_lcot.main(flags) is None
    out = capsys.readouterr().out
    assert f"exiting at iteration 1: the process ran for --exit-duration-in-mins {minutes}" in out
