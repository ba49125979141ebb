"""Median seconds per training step of a real `pretrain_lcot.py` run, read from its metrics file.

Shared by the benchmarks that time whole launches (data_parallel_step_time.py,
pipeline_latent.py): each record's logged tokens/s over the step's tokens (global batch x
sequence length, read from the flags), so launch and set-up time never count.
"""

from __future__ import annotations

import os
import statistics
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from megatron_lcot.runs import read_metrics, run_pretrain  # noqa: E402


def median_step_seconds(launcher: list, flags: list, workdir: str, name: str, skip: int) -> float:
    """Run pretrain_lcot.py under `launcher` with `flags` (one log line per step) and one
    OpenMP thread per process; the median step time after the first `skip` steps. Exits with
    the run's stderr when it fails."""
    metrics = os.path.join(workdir, f"{name}.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT, "DS_ACCELERATOR": "cpu"}
    result = run_pretrain(
        [*flags, "--log-interval", "1", "--metrics-file", metrics],
        cwd=workdir,
        launcher=tuple(launcher),
        env=env,
    )
    if result.returncode != 0:
        sys.exit(f"error: {name} failed:\n{result.stderr[-2000:]}")
    train = [record for record in read_metrics(metrics) if record["split"] == "train"]
    tokens = int(flags[flags.index("--global-batch-size") + 1]) * int(flags[flags.index("--seq-length") + 1])
    return statistics.median(tokens / record["tokens_per_sec"] for record in train[skip:])
