"""megatron-core DDP's overlapped collectives (on by default) against the synchronous ones.

2 ranks under torchrun, gloo, with the distributed optimizer, adaptive latent CoT on real text:
gradient buckets reduced during backward and weight buckets all-gathered in the next forward's
pre-hooks (the defaults) must train exactly as `--no-overlap-grad-reduce
--no-overlap-param-gather`; and a checkpoint written mid-run (weights still being gathered when
the step returns) must resume to the same run.
"""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics, run_pretrain
from tests.distributed.test_data_parallel_equivalence import TORCHRUN_2, _flags
from tests.distributed.test_pipeline_equivalence import assert_same_run

DISTRIBUTED = ["--use-distributed-optimizer"]
SYNCHRONOUS = ["--no-overlap-grad-reduce", "--no-overlap-param-gather"]


def _run(tmp_path, dataset, name: str, extra: list) -> list:
    metrics = tmp_path / f"{name}.jsonl"
    result = run_pretrain(
        [*_flags(dataset, tmp_path), *DISTRIBUTED, *extra, "--metrics-file", metrics],
        cwd=tmp_path,
        launcher=TORCHRUN_2,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(metrics)


@pytest.mark.slow
def test_overlapped_collectives_match_synchronous_and_resume(tmp_path, sotu_indexed_dataset):
    """Proves the overlapped defaults train as the synchronous collectives (losses, grad norms,
    latent statistics, validation) across a save at iteration 5 right after an overlapped step
    and a resume from it: the saved weights are the updated ones."""
    checkpoints = tmp_path / "checkpoints"
    synchronous = _run(tmp_path, sotu_indexed_dataset, "synchronous", SYNCHRONOUS)
    first_half = _run(
        tmp_path,
        sotu_indexed_dataset,
        "first_half",
        ["--save", checkpoints, "--save-interval", "5", "--exit-interval", "5"],
    )
    resumed = _run(tmp_path, sotu_indexed_dataset, "resumed", ["--save", checkpoints, "--load", checkpoints])
    first_train = [r for r in first_half if r["split"] == "train"]
    assert [r["iteration"] for r in first_train] == [1, 2, 3, 4, 5]
    assert_same_run(first_train + resumed, synchronous)
