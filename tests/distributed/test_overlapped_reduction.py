"""megatron-core DDP's overlapped collectives (on by default) against the synchronous ones.

2 ranks under torchrun, gloo, with the distributed optimizer, adaptive latent CoT on real text:
gradient buckets reduced during backward and weight buckets all-gathered in the next forward's
pre-hooks (the defaults) must train exactly as `--no-overlap-grad-reduce
--no-overlap-param-gather`; and a checkpoint written mid-run (weights still being gathered when
the step returns) must resume to the same run. The checkpoint's model directory (what evaluation, export and
generation load) must hold the updated weights too: a resume alone cannot see stale ones there,
because the distributed optimizer's own files restore the weight shards over them.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from megatron_lcot.checkpoint.checkpointing import MODEL_DIRNAME, iteration_dir
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


def _saved_weights(root, iteration: int, out) -> dict:
    """The model directory of a checkpoint (a torch.distributed.checkpoint directory), read
    back in this process without a process group: {name: tensor}."""
    dcp_to_torch_save(os.path.join(iteration_dir(str(root), iteration), MODEL_DIRNAME), str(out))
    return {k: v for k, v in torch.load(out, weights_only=False).items() if isinstance(v, torch.Tensor)}


@pytest.mark.slow
def test_overlapped_collectives_match_synchronous_and_resume(tmp_path, sotu_indexed_dataset):
    """Proves the overlapped defaults train as the synchronous collectives (losses, grad norms,
    latent statistics, validation) across a save at iteration 5 right after an overlapped step
    and a resume from it: the saved weights are the updated ones, both in the optimizer's files
    (the resume) and in the model directory (equal to the synchronous run's save at 5)."""
    checkpoints, synchronous_checkpoints = tmp_path / "checkpoints", tmp_path / "synchronous_checkpoints"
    synchronous = _run(
        tmp_path,
        sotu_indexed_dataset,
        "synchronous",
        [*SYNCHRONOUS, "--save", synchronous_checkpoints, "--save-interval", "5"],
    )
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
    got = _saved_weights(checkpoints, 5, tmp_path / "overlapped_weights.pt")
    want = _saved_weights(synchronous_checkpoints, 5, tmp_path / "synchronous_weights.pt")
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
