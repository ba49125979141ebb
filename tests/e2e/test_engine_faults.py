"""Faults under every engine, with real runs of pretrain_lcot.py (faults injected at their source
by tests/e2e/pretrain_with_faults.py).

* A NaN gradient with a finite loss under DeepSpeed ZeRO-1/2/3 (bf16) applies no update: the
  weights, fp32 masters and LR schedule stay as they were, the run's and the engine's
  skipped-step counters say 1.
* A save that fails on a non-zero rank never moves the marker; every rank says which rank failed.
* A rank that raises is named, with its error, by the rank whose collective then fails.
* Resuming under another optimizer seam is refused before anything is built, naming the flag
  and the command that converts; that command's output starts the new seam.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import (
    REPO_ROOT,
    TINY_MODEL_FLAGS,
    nested_tensors,
    read_checkpoint_weights,
    read_metrics,
    tool_env,
)
from tests.distributed.test_data_parallel_equivalence import DS_CONFIGS, deepspeed_launcher

DRIVER = os.path.join(REPO_ROOT, "tests", "e2e", "pretrain_with_faults.py")
TORCHRUN_2 = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
MOCK = [
    *TINY_MODEL_FLAGS,
    "--mock-data",
    "--vocab-size",
    "256",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "4",
    "--log-interval",
    "1",
    "--eval-iters",
    "1",
    "--eval-interval",
    "100",
    "--lr",
    "3e-3",
]


def _run(flags: list, launcher: tuple, fault: str | None, cwd) -> subprocess.CompletedProcess:
    env = tool_env()
    if fault is not None:
        env["LCOT_TEST_FAULT"] = fault
    return subprocess.run(
        [*launcher, DRIVER, *map(str, flags)], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def _rank_state(iteration_dir) -> dict:
    return torch.load(iteration_dir / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero1.json", "zero2.json", "zero3.json"])
def test_deepspeed_skips_a_nan_gradient_with_a_finite_loss(tmp_path, config):
    """Rank 0's third backward gives the output layer a NaN gradient (1 micro-batch per rank
    per step: iteration 3); the reduced gradient is NaN on both ranks and the step is skipped."""
    flags = [
        *MOCK,
        "--train-iters",
        3,
        "--save-interval",
        1,
        "--bf16",
        "--save",
        tmp_path / "run",
        "--deepspeed",
        "--deepspeed_config",
        os.path.join(DS_CONFIGS, config),
        "--metrics-file",
        tmp_path / "m.jsonl",
        "--latent-steps",
        2,
        "--halting",
        "adaptive",
    ]
    result = _run(flags, deepspeed_launcher(2), "nan_grad:0:3", tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert (
        "iteration 3: skipped the update (loss or grad norm not finite: grad norm inf); 1 in a row, 1 in all"
        in result.stdout
    )
    records = read_metrics(tmp_path / "m.jsonl")
    assert [r["grad_norm"] for r in records[:3]][2] == float("inf")
    assert all(0 < r["grad_norm"] < 100 for r in records[:2]) and all(r["loss"] < 10 for r in records[:3])

    before, after = (tmp_path / "run" / f"iter_000000{i}" for i in (2, 3))
    for partition in sorted(os.listdir(before / "deepspeed")):  # fp32 masters, Adam moments: every rank's
        if partition.endswith("optim_states.pt"):
            states = [
                nested_tensors(torch.load(d / "deepspeed" / partition, weights_only=False))
                for d in (before, after)
            ]
            assert states[0].keys() == states[1].keys() and len(states[0]) > 2
            assert all(torch.equal(tensor, states[1][path]) for path, tensor in states[0].items()), partition
    if config != "zero3.json":  # ZeRO-3 writes no gathered weights
        weights = [read_checkpoint_weights(d, tmp_path) for d in (before, after)]
        assert all(torch.equal(tensor, weights[1][name]) for name, tensor in weights[0].items())
    state = _rank_state(after)
    assert state["train_state"]["skipped_steps_total"] == state["train_state"]["skipped_steps_in_a_row"] == 1
    assert (
        state["opt_param_scheduler"]["num_steps"] == _rank_state(before)["opt_param_scheduler"]["num_steps"]
    )
    engine_file = sorted((after / "deepspeed").glob("*mp_rank_00_model_states.pt"))[
        0
    ]  # ZeRO-3: zero_pp_rank_0_...
    engine_state = torch.load(engine_file, weights_only=False)  # DeepSpeed's own file: pickled objects
    assert engine_state["skipped_steps"] == 1 and engine_state["global_steps"] == 3


@pytest.mark.slow
def test_a_save_failing_on_rank_1_does_not_move_the_marker(tmp_path):
    """PP=2: rank 1 writes its stage's file itself. Its second write (the iteration-4 save)
    hits a full disk: the marker stays at 2, nothing of iteration 4 remains, both ranks exit 1
    naming rank 1 and the error."""
    flags = [
        *MOCK,
        "--train-iters",
        6,
        "--save-interval",
        2,
        "--save",
        tmp_path / "run",
        "--pipeline-model-parallel-size",
        2,
    ]
    result = _run(flags, TORCHRUN_2, "save_fails:1:2", tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("pretrain_lcot.py: error: saving iteration 4 to") == 1, output[-4000:]
    assert (
        "failed on rank 1 (OSError: [Errno 28] No space left on device: "
        f"'{tmp_path / 'run' / '.tmp_iter_0000004' / 'mp_rank_00_001' / 'model_optim_rng.pt'}'); "
        "latest_checkpointed_iteration.txt still names iteration 2."
    ) in output
    assert (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert sorted(os.listdir(tmp_path / "run")) == ["iter_0000002", "latest_checkpointed_iteration.txt"]


@pytest.mark.slow
def test_the_rank_whose_collective_fails_names_the_first_failing_rank(tmp_path):
    result = _run([*MOCK, "--train-iters", 6], TORCHRUN_2, "raise:1:3", tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert (
        "pretrain_lcot.py: error: rank 0: a collective with the other ranks failed; the first rank to fail "
        "was rank 1: ValueError: injected fault (this rank saw: "
    ) in output, output[-4000:]


def _main(flags: list):
    import pretrain_lcot

    return pretrain_lcot.main([str(flag) for flag in flags])


@pytest.mark.slow  # three in-process runs and a reshard: 183 s on the loaded 2-core machine
def test_resuming_under_another_engine_is_refused_and_the_named_command_converts(tmp_path, capsys):
    """A megatron DDP checkpoint resumed with --use-distributed-optimizer or --deepspeed: exit 2
    before any work, naming the flag and the reshard command; that command's output starts a
    distributed-optimizer run from the checkpoint's weights."""
    from megatron_lcot.checkpoint import reshard

    flags = [*MOCK, "--train-iters", 2]
    _main([*flags, "--save", tmp_path / "ddp"])
    zero2 = ["--deepspeed", "--deepspeed_config", os.path.join(DS_CONFIGS, "zero2.json")]
    for extra, flag, now in (
        (["--use-distributed-optimizer"], "--use-distributed-optimizer", "megatron distributed-optimizer"),
        (zero2, "--deepspeed", "deepspeed zero-2"),
    ):
        with pytest.raises(SystemExit) as refused:
            _main([*flags, *extra, "--load", tmp_path / "ddp"])
        assert refused.value.code == 2
        err = capsys.readouterr().err
        assert (
            f"pretrain_lcot.py: error: --load {str(tmp_path / 'ddp')!r}: the checkpoint's optimizer state was "
            f"saved by megatron ddp but this run trains with {now} ({flag} differs); resume with the "
            f"checkpoint's {flag}, or convert its weights and start a new optimizer from them: "
            f"tools/convert_checkpoint.py reshard --load {tmp_path / 'ddp'} --save NEW_DIR --as-initial-weights, "
            "then --load NEW_DIR."
        ) in err, err
        assert "model:" not in capsys.readouterr().out  # refused before building anything

    reshard.reshard(
        str(tmp_path / "ddp"), str(tmp_path / "converted"), 1, 1, sharded=True, as_initial_weights=True
    )
    _main(
        [
            *flags,
            "--use-distributed-optimizer",
            "--load",
            tmp_path / "converted",
            "--save",
            tmp_path / "distopt",
            "--train-iters",
            1,
            "--metrics-file",
            tmp_path / "m.jsonl",
        ]
    )
    assert "starting from scratch" in capsys.readouterr().out
    converted, trained = (
        read_checkpoint_weights(tmp_path / d, tmp_path)
        for d in ("converted/iter_0000000", "ddp/iter_0000002")
    )
    assert all(torch.equal(tensor, trained[name]) for name, tensor in converted.items())
    assert (tmp_path / "distopt" / "iter_0000001" / "optimizer").is_dir()


def test_zero_stage_change_is_refused_with_the_flag_named():
    from megatron_lcot.checkpoint.checkpointing import CheckpointError, _check_same_engine
    from megatron_lcot.run_config import RunConfig

    config = RunConfig.from_values(
        dict(
            num_layers=1,
            hidden_size=8,
            num_attention_heads=1,
            seq_length=8,
            train_iters=1,
            deepspeed=True,
            deepspeed_config=os.path.join(DS_CONFIGS, "zero2.json"),
            zero_stage=3,
        )
    )
    with pytest.raises(
        CheckpointError,
        match=r"saved by deepspeed zero-2 but this run trains with deepspeed zero-3 "
        r"\(--zero-stage \(or zero_optimization.stage in --deepspeed_config\) "
        r"differs\); resume with the checkpoint's --zero-stage",
    ):
        _check_same_engine("deepspeed zero-2", config, "ckpt")
    _check_same_engine("deepspeed zero-3", config, "ckpt")  # the same seam resumes
