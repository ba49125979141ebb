"""Data parallelism behind the optimizer seam against one process, on real text.

pretrain_lcot.py runs 10 iterations of adaptive latent CoT (fp32, gloo, SOTU, global batch 8 =
4 micro-batches in one process, 2 per rank on 2 ranks) and the losses, grad norms and latent-step
statistics of every layout, and the final validation loss, must agree within 1e-5 relative:

* DeepSpeed ZeRO-1/2/3 (and ZeRO-3 with optimizer and parameter offload), launched with the real
  `deepspeed` launcher (`--num_gpus 2` on the CPU), from the shipped examples/ds_configs/;
* megatron-core DDP, and its distributed optimizer, under torchrun;
* ZeRO-2 composed with `--tensor-model-parallel-size 2`.

`--clip-grad 0.5` sits below the grad norms, so clipping acts on every step: a seam that left
DeepSpeed's own `gradient_clipping` default (1.0) in place would drift from the first update.
ZeRO-2 is the CI representative; the rest are marked slow.
"""

from __future__ import annotations

import os
import sys

import pytest

from tests.conftest import REPO_ROOT, TINY_MODEL_FLAGS, corpus_flags, read_metrics, run_pretrain
from tests.distributed.test_pipeline_equivalence import ADAPTIVE_2, assert_same_run

TORCHRUN_2 = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
DS_CONFIGS = os.path.join(REPO_ROOT, "examples", "ds_configs")


def deepspeed_launcher(processes: int) -> tuple:
    """The real `deepspeed` launcher of this venv on a free port (`--num_gpus` is required on CPU)."""
    from megatron_lcot.parallel import free_port

    return (
        os.path.join(os.path.dirname(sys.executable), "deepspeed"),
        "--num_gpus",
        str(processes),
        "--master_port",
        str(free_port()),
    )


def _flags(dataset: dict, tmp_path) -> list:
    return [
        *TINY_MODEL_FLAGS,
        *ADAPTIVE_2,
        *corpus_flags(dataset, tmp_path),
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "8",
        "--train-iters",
        "10",
        "--lr",
        "3e-3",
        "--clip-grad",
        "0.5",
        "--log-interval",
        "1",
        "--eval-interval",
        "100",
        "--eval-iters",
        "1",
        "--use-cpu-initialization",
        "--seed",
        "7",
    ]


def _train_records(tmp_path, dataset, name: str, extra: list, launcher: tuple) -> list:
    metrics = tmp_path / f"{name}.jsonl"
    result = run_pretrain(
        [*_flags(dataset, tmp_path), *extra, "--metrics-file", metrics],
        cwd=tmp_path,
        launcher=launcher,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(metrics)  # training records and the final validation


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, sotu_indexed_dataset) -> list:
    tmp_path = tmp_path_factory.mktemp("one_process")
    records = _train_records(tmp_path, sotu_indexed_dataset, "one", [], (sys.executable,))
    train = [r for r in records if r["split"] == "train"]
    assert max(r["grad_norm"] for r in train) > 0.5  # clipping acts
    assert train[-1]["lm_loss"] < train[0]["lm_loss"]
    return records


def _deepspeed(config: str, *extra) -> list:
    return ["--deepspeed", "--deepspeed_config", os.path.join(DS_CONFIGS, config), *extra]


def test_zero2_under_the_deepspeed_launcher_matches_one_process(tmp_path, sotu_indexed_dataset, one_process):
    records = _train_records(
        tmp_path, sotu_indexed_dataset, "zero2", _deepspeed("zero2.json"), deepspeed_launcher(2)
    )
    assert_same_run(records, one_process)


SLOW_LAYOUTS = {
    "zero1": _deepspeed("zero1.json"),
    "zero3": _deepspeed("zero3.json"),
    "zero3_offload": _deepspeed("zero3_offload.json"),
    "zero2_file_zero1_flag": _deepspeed("zero2.json", "--zero-stage", "1"),
    "zero2_tp2": _deepspeed("zero2.json", "--tensor-model-parallel-size", "2"),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(SLOW_LAYOUTS), ids=list(SLOW_LAYOUTS))
def test_deepspeed_layouts_match_one_process(tmp_path, sotu_indexed_dataset, one_process, layout):
    records = _train_records(
        tmp_path, sotu_indexed_dataset, layout, SLOW_LAYOUTS[layout], deepspeed_launcher(2)
    )
    assert_same_run(records, one_process)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--use-distributed-optimizer"]], ids=["ddp", "distributed_optimizer"])
def test_megatron_core_data_parallel_matches_one_process(tmp_path, sotu_indexed_dataset, one_process, extra):
    records = _train_records(tmp_path, sotu_indexed_dataset, "ddp", extra, TORCHRUN_2)
    assert_same_run(records, one_process)


@pytest.mark.slow
def test_zero1_composes_with_pipeline_parallelism(tmp_path, sotu_indexed_dataset):
    """ZeRO-1 on each pipeline stage (vanilla, PP=2, DP=1): DeepSpeed steps each stage's
    parameters while megatron-core's 1F1B schedule moves activations between the stages."""
    vanilla = ["--latent-steps", "0", "--halting", "none"]
    reference = _train_records(tmp_path, sotu_indexed_dataset, "one_vanilla", vanilla, (sys.executable,))
    records = _train_records(
        tmp_path,
        sotu_indexed_dataset,
        "pp2_zero1",
        [*vanilla, *_deepspeed("zero1.json", "--pipeline-model-parallel-size", "2")],
        deepspeed_launcher(2),
    )
    assert_same_run(records, reference)
