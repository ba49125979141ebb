"""Pipeline parallelism (and TP x PP) against one process, from the same seed, on real text.

pretrain_lcot.py runs 10 iterations (fp32, gloo, SOTU token ids, 4 micro-batches per step) in
one process and under torchrun; the losses, grad norms and latent-step statistics must agree
within 1e-5 relative. `--use-cpu-initialization` makes the initial weights independent of the
layout (model/seeded_init.py); latent modes cross the stages as virtual pipeline chunks
(parallel/pipeline_passes.py), so any lost gradient path or a wrong last-to-first hand-over shows
here as a loss or grad-norm difference.

The one-process run shares the latent engine with the pipeline chunks, so a fault in the engine
itself (KV reuse for halted tokens, say) would show on both sides alike. The adaptive run is
therefore also checked against the naive token-by-token reference (tests/reference/naive_lm.py,
which shares no code with the model): the pipeline run's final validation loss must equal the
reference's loss on the same validation samples with the weights the pipeline run saved.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from tests.conftest import PRETRAIN, TINY_MODEL_FLAGS, corpus_flags, read_metrics, run_pretrain

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node")
TRAIN_ITERS = 10


def _flags(dataset: dict, tmp_path) -> list:
    return [
        *TINY_MODEL_FLAGS,
        *corpus_flags(dataset, tmp_path),
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "8",
        "--train-iters",
        str(TRAIN_ITERS),
        "--lr",
        "3e-3",
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


def naive_validation_lm_loss(checkpoint, flags: list) -> tuple:
    """The naive reference's mean lm loss over the first validation global batch (the samples
    `--eval-iters 1` evaluates, in order) with `checkpoint`'s weights, and the executed latent
    steps of each of its tokens ([samples, seq]). `flags`: the run's, at one process."""
    from megatron_lcot import parallel
    from megatron_lcot.arguments import parse_args, set_padded_vocab_size
    from megatron_lcot.data.tokenizers import build_tokenizer
    from megatron_lcot.inference.loading import load_trained_model
    from megatron_lcot.run_config import RunConfig
    from megatron_lcot.training.providers import train_valid_test_datasets_provider
    from tests.reference import naive_lm

    trained = load_trained_model(str(checkpoint))
    try:
        args = parse_args([str(flag) for flag in flags])
        tokenizer = build_tokenizer(
            args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file, args.vocab_size
        )
        set_padded_vocab_size(args, tokenizer.vocab_size)
        samples = [args.train_iters * args.global_batch_size, args.global_batch_size, 0]
        _, valid, _ = train_valid_test_datasets_provider(tokenizer, RunConfig.from_values(args), samples)
        batch = [valid[index] for index in range(args.global_batch_size)]
        tokens, labels, loss_mask = (
            torch.stack([torch.as_tensor(sample[key]) for sample in batch])
            for key in ("tokens", "labels", "loss_mask")
        )
        config = trained.model.config
        with torch.no_grad():
            result = naive_lm.adaptive_forward(
                naive_lm.NaiveWeights.from_model(trained.model),
                tokens,
                config.latent_steps,
                config.halting_threshold,
                config.embedding_scale,
                labels=labels,
                loss_weight=config.halting_loss_weight,
                correctness_exponent=config.halting_correctness_exponent,
            )
        mask = loss_mask.double()
        return float((result.lm_loss.double() * mask).sum() / mask.sum()), result.latent_steps
    finally:
        parallel.destroy()


def _run_records(tmp_path, dataset, name: str, extra: list, processes: int, script: str = PRETRAIN) -> list:
    metrics = tmp_path / f"{name}.jsonl"
    launcher = (sys.executable,) if processes == 1 else (*TORCHRUN, str(processes))
    result = run_pretrain(
        [*_flags(dataset, tmp_path), *extra, "--metrics-file", metrics],
        cwd=tmp_path,
        launcher=launcher,
        timeout=600,
        script=script,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(metrics)


def assert_same_run(got_records: list, want_records: list, rel: float = 1e-5) -> None:
    """Training records (loss, grad norm, latent-step statistics) and the final validation
    (forward-only schedule) agree."""
    got, want = ([r for r in records if r["split"] == "train"] for records in (got_records, want_records))
    assert len(got) == len(want) == TRAIN_ITERS
    got_valid, want_valid = (
        [r for r in records if r["split"] != "train"][-1] for records in (got_records, want_records)
    )
    assert got_valid["lm_loss"] == pytest.approx(want_valid["lm_loss"], rel=rel)
    for index, (g, w) in enumerate(zip(got, want)):
        for key in ("loss", "lm_loss", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=rel), (index, key, g[key], w[key])
        assert g["mean_latent_steps"] == pytest.approx(w["mean_latent_steps"], rel=rel), index
        assert g["halted_share"] == pytest.approx(w["halted_share"], rel=rel), index


STEPWISE_2 = ["--latent-steps", "2", "--latent-layout", "stepwise"]
# Threshold near the initial reach after two gates (0.9^2): the router's first updates split
# the tokens, so step 2 is pruned for some and KV reuse runs on both stages.
ADAPTIVE_2 = [*STEPWISE_2, "--halting", "adaptive", "--halting-threshold", "0.81"]
INTERLEAVED_1 = ["--latent-steps", "1", "--latent-layout", "interleaved"]
MODES = {
    "vanilla": [],
    "stepwise_k2": STEPWISE_2,
    "adaptive_k2": ADAPTIVE_2,
    "interleaved_k1": INTERLEAVED_1,
}
CI_MODES = ("adaptive_k2",)  # the rest run with -m slow


@pytest.mark.parametrize(
    "mode", [m if m in CI_MODES else pytest.param(m, marks=pytest.mark.slow) for m in MODES]
)
def test_pipeline_parallel_matches_one_process(tmp_path, sotu_indexed_dataset, mode):
    reference = _run_records(tmp_path, sotu_indexed_dataset, "one", MODES[mode], 1)
    checkpoint = tmp_path / "pp2_checkpoint"
    pipeline = [*MODES[mode], "--pipeline-model-parallel-size", "2"]
    records = _run_records(tmp_path, sotu_indexed_dataset, "pp2", [*pipeline, "--save", checkpoint], 2)
    assert_same_run(records, reference)
    train = [r for r in reference if r["split"] == "train"]
    assert train[-1]["lm_loss"] < train[0]["lm_loss"]
    if mode == "adaptive_k2":  # pruning happened, so the halting state really crossed stages
        assert any(0.0 < r["halted_share"][-1] < 1.0 for r in train)
        naive_loss, latent_steps = naive_validation_lm_loss(
            checkpoint, [*_flags(sotu_indexed_dataset, tmp_path), *MODES[mode]]
        )
        assert len(set(latent_steps.flatten().tolist())) >= 2, "no token halted on the validation batch"
        final = [r for r in records if r["split"] != "train"][-1]
        assert final["lm_loss"] == pytest.approx(naive_loss, rel=1e-5)


@pytest.mark.slow
def test_custom_schedule_runs_unchanged_across_stages(tmp_path, sotu_indexed_dataset):
    """A schedule swapped in through the spec (tests/distributed/residual_schedule.py: every pass
    reads the token states, which then cross chunks on the first stage) trains under PP=2 with
    the same losses, grad norms and halting as in one process: the pipeline chunks ask the
    schedule what each pass does instead of knowing the layouts."""
    script = os.path.join(os.path.dirname(__file__), "residual_schedule.py")
    reference = _run_records(tmp_path, sotu_indexed_dataset, "one", ADAPTIVE_2, 1, script)
    records = _run_records(
        tmp_path, sotu_indexed_dataset, "pp2", [*ADAPTIVE_2, "--pipeline-model-parallel-size", "2"], 2, script
    )
    assert_same_run(records, reference)
    assert any(0.0 < r["halted_share"][-1] < 1.0 for r in reference if r["split"] == "train")


@pytest.mark.slow
@pytest.mark.parametrize(
    "parallel_only, both",
    [(["--tensor-model-parallel-size", "2"], []), ([], ["--global-batch-size", "16"])],
    ids=["tp2_pp2", "dp2_pp2"],
)
def test_pipeline_composes_with_tensor_and_data_parallel(tmp_path, sotu_indexed_dataset, parallel_only, both):
    """4 processes: adaptive K=2 at TP=2 x PP=2 (head-sharded KV stores on both stages, the
    decision agreed over TP) and at DP=2 x PP=2 (global batch 16 in both runs)."""
    reference = _run_records(tmp_path, sotu_indexed_dataset, "one", [*ADAPTIVE_2, *both], 1)
    records = _run_records(
        tmp_path,
        sotu_indexed_dataset,
        "4proc",
        [*ADAPTIVE_2, *both, *parallel_only, "--pipeline-model-parallel-size", "2"],
        4,
    )
    assert_same_run(records, reference)
