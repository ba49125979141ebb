"""pretrain_lcot.py on 2 gloo processes (torchrun) against 1 process on the same global batch.

Data parallelism (gradient averaging in the optimizer seam) and tensor parallelism (sharded
model, grad norm over shards; `--use-cpu-initialization` so both start from the same weights)
must reproduce the one-process losses and grad norms. Pipeline parallelism (every mode, and
TP x PP) is checked the same way in tests/distributed/test_pipeline_equivalence.py.
"""

from __future__ import annotations

import sys

import pytest

from tests.conftest import TINY_MODEL_FLAGS, read_metrics, run_pretrain

pytestmark = pytest.mark.slow

TORCHRUN_2 = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
FLAGS = [
    *TINY_MODEL_FLAGS,
    "--mock-data",
    "--vocab-size",
    "200",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "8",
    "--train-iters",
    "4",
    "--log-interval",
    "1",
    "--eval-interval",
    "100",
    "--eval-iters",
    "1",
    "--clip-grad",
    "0",
    "--lr",
    "1e-2",
    "--use-cpu-initialization",
]


def _train_records(tmp_path, name: str, extra: list, launcher) -> list:
    metrics = tmp_path / f"{name}.jsonl"
    result = run_pretrain([*FLAGS, *extra, "--metrics-file", metrics], cwd=tmp_path, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    return [r for r in read_metrics(metrics) if r["split"] == "train"]


ADAPTIVE = ["--latent-steps", "2", "--latent-layout", "stepwise", "--halting", "adaptive"]


@pytest.mark.parametrize("mode", [[], ADAPTIVE], ids=["vanilla", "adaptive"])
def test_data_and_tensor_parallel_match_one_process(tmp_path, mode):
    """Adaptive mode under TP=2 exercises head-sharded stepwise passes with the KV store, the
    vocab-parallel correctness penalty and the replicated router (counted once in the norm)."""
    reference = _train_records(tmp_path, "one", mode, (sys.executable,))
    for name, extra in (("dp2", []), ("tp2", ["--tensor-model-parallel-size", "2"])):
        records = _train_records(tmp_path, name, [*mode, *extra], TORCHRUN_2)
        assert len(records) == len(reference) == 4, name
        for got, want in zip(records, reference):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), name
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), name
            assert got["mean_latent_steps"] == want["mean_latent_steps"], name
    assert reference[-1]["loss"] < reference[0]["loss"] - 0.5
