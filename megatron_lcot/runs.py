"""Launching `pretrain_lcot.py` as a subprocess and reading what it wrote: the one copy that the
examples, benchmarks and tests share.

    run_pretrain(flags, ...)      the command under a launcher (python, torchrun, deepspeed)
    read_metrics(path)            the JSON records of a --metrics-file, in order
    final_validation(records)     the run's final validation record
    train_flops(records)          the cumulative training FLOPs the run logged
    train_and_report(...)         one model of an example's comparison, trained and summarised
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_SCRIPT = os.path.join(REPO_ROOT, "pretrain_lcot.py")
# torch.distributed rendezvous variables: a child must pick its own (a parent that initialised
# torch.distributed still holds MASTER_PORT, and the child would fail with EADDRINUSE).
RENDEZVOUS_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# The share of executed tokens the recipe computes the correctness penalty on.
RECIPE_PENALTY_FRACTION = 0.25


def adaptive_recipe(train_iters: int) -> str:
    """The adaptive halting recipe's flags for a run of `train_iters` iterations (docs/method.md):
    a halting warm-up of 16% of training without pruning, the correctness penalty on a quarter of
    the executed tokens, lambda 0.3, tau 0.2. The examples pass it; the flags' defaults do not."""
    return (
        f"--halting-warmup-iters {round(0.16 * train_iters)} --halting-penalty-fraction "
        f"{RECIPE_PENALTY_FRACTION} --halting-loss-weight 0.3 --halting-threshold 0.2"
    )


def subprocess_env(**extra: str) -> dict:
    """Environment for a training or tool subprocess: 1 OpenMP thread per process, this
    repository first on the path, no inherited rendezvous variables, plus `extra`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT, **extra}
    for name in RENDEZVOUS_VARIABLES:
        env.pop(name, None)
    return env


def run_pretrain(
    flags: list,
    cwd=None,
    launcher: tuple = (sys.executable,),
    env: dict | None = None,
    timeout: float | None = None,
    log_path: str | None = None,
    capture: bool = True,
    script: str = PRETRAIN_SCRIPT,
) -> subprocess.CompletedProcess:
    """Run pretrain_lcot.py (or a script taking its command line) with `flags` (stringified)
    under `launcher`; the CompletedProcess. Output: captured as text (`capture`), written to
    `log_path`, or left on this terminal."""
    command = [*launcher, script, *map(str, flags)]
    env = subprocess_env() if env is None else env
    if log_path is not None:
        with open(log_path, "w", encoding="utf-8") as log:
            return subprocess.run(
                command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            )
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=capture, text=capture or None, timeout=timeout
    )


def read_metrics(path) -> list:
    """The JSON records of a --metrics-file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def final_validation(records: list) -> dict:
    """The last validation record marked final (what pretrain_lcot.py prints as `final:`)."""
    return [record for record in records if record["split"] == "valid" and record.get("final")][-1]


def train_flops(records: list) -> float:
    """The cumulative training FLOPs of the run (0 when it logged no training step)."""
    return max((record["train_flops"] for record in records if record["split"] == "train"), default=0.0)


def train_and_report(name: str, run_args: str, common: list, out_dir: str, log_file: bool = False) -> dict:
    """Run pretrain_lcot.py for one model of an example's comparison (`common` + `run_args`,
    saving under `<out_dir>/<name>/`); return its final validation record, wall time and
    training FLOPs; exit with a message when it fails. With `log_file` the run's output goes to
    `<out_dir>/<name>/train.log` (runs in parallel)."""
    run_dir = os.path.join(out_dir, name)
    metrics_file = os.path.join(run_dir, "metrics.jsonl")
    os.makedirs(run_dir, exist_ok=True)
    if os.path.exists(metrics_file):
        os.remove(metrics_file)
    flags = [
        *common,
        *run_args.split(),
        "--save",
        os.path.join(run_dir, "checkpoints"),
        "--metrics-file",
        metrics_file,
    ]
    print(f"\n=== training {name}: {' '.join(run_args.split())}", flush=True)
    start = time.time()
    log_path = os.path.join(run_dir, "train.log") if log_file else None
    returncode = run_pretrain(flags, env=dict(os.environ), log_path=log_path, capture=False).returncode
    if returncode != 0:
        sys.exit(f"training {name} failed (its error is printed {log_path or 'above'})")
    wall = time.time() - start
    records = read_metrics(metrics_file)
    return {**final_validation(records), "wall_s": wall, "train_flops": train_flops(records)}
