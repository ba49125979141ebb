"""megatron-core DDP's overlapped collectives (on by default) against the synchronous ones.

2 ranks under torchrun, gloo, with the distributed optimizer, adaptive latent CoT on real text:
gradient buckets reduced during backward and weight buckets all-gathered in the next forward's
pre-hooks (the defaults) must train exactly as `--no-overlap-grad-reduce
--no-overlap-param-gather`; and a checkpoint written mid-run (weights still being gathered when
the step returns) must resume to the same run.

The resume alone cannot see whether the checkpoint's weights are the updated ones: the
distributed optimizer restores its shard of every weight from its own saved state and gathers
the rest in the next forward, so a save that skipped the pending gather still resumes exactly.
The weights-only readers (--skip-train evaluation, export, generation) read the saved model
weights and nothing else, so the test also evaluates the mid-run checkpoint that way.
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
    synchronous = _run(tmp_path, sotu_indexed_dataset, "synchronous", [*SYNCHRONOUS, "--eval-interval", "5"])
    first_half = _run(
        tmp_path,
        sotu_indexed_dataset,
        "first_half",
        ["--save", checkpoints, "--save-interval", "5", "--exit-interval", "5"],
    )
    # the saved model weights alone, read as evaluation reads them, are iteration 5's
    (evaluated,) = _run(tmp_path, sotu_indexed_dataset, "evaluated", ["--load", checkpoints, "--skip-train"])
    (at_five,) = [r for r in synchronous if r["split"] == "valid" and r["iteration"] == 5]
    assert evaluated["iteration"] == 5
    assert evaluated["lm_loss"] == pytest.approx(at_five["lm_loss"], rel=1e-5)
    resumed = _run(tmp_path, sotu_indexed_dataset, "resumed", ["--save", checkpoints, "--load", checkpoints])
    first_train = [r for r in first_half if r["split"] == "train"]
    assert [r["iteration"] for r in first_train] == [1, 2, 3, 4, 5]
    assert_same_run(first_train + resumed, synchronous)
