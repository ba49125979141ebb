"""Checkpoints you can trust and faults that end cleanly, on real runs of pretrain_lcot.py.

In-process runs (one process, the process group of the test session) cover the exits that do
not need a second rank: --exit-interval, --exit-duration-in-mins, --skip-train and NaN/inf steps
from a real overflow. Two-process runs (slow) send real signals, kill and freeze real ranks,
and reshard a tensor-parallel checkpoint.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import (
    PRETRAIN,
    REPO_ROOT,
    TINY_MODEL_FLAGS,
    nested_tensors,
    read_checkpoint_weights,
    read_metrics,
    run_pretrain,
    tool_env,
)

MOCK = [
    *TINY_MODEL_FLAGS,
    "--mock-data",
    "--vocab-size",
    "256",
    "--micro-batch-size",
    "2",
    "--log-interval",
    "1",
    "--eval-iters",
    "2",
    "--eval-interval",
    "100",
]
TORCHRUN_2 = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")


def _main(flags: list):
    import pretrain_lcot

    return pretrain_lcot.main([str(flag) for flag in flags])


def _marker(root) -> int:
    return int((root / "latest_checkpointed_iteration.txt").read_text())


def _final_validation(records: list) -> dict:
    return [r for r in records if r["split"] == "valid" and r["final"]][-1]


def test_exit_interval_and_duration_save_and_stop_then_skip_train_evaluates(tmp_path, capsys):
    """--exit-interval 4 stops a 6-iteration run after iteration 4 with a checkpoint and no
    final evaluation; resuming finishes it; --skip-train on the result prints the validation
    line the training run printed last, from the weights alone. --exit-duration-in-mins stops
    after the first step."""
    interval = [
        *MOCK,
        "--train-iters",
        6,
        "--save",
        tmp_path / "run",
        "--metrics-file",
        tmp_path / "run.jsonl",
    ]
    assert _main([*interval, "--exit-interval", 4]) is None
    out = capsys.readouterr().out
    assert "exiting at iteration 4: iteration 4 is a multiple of --exit-interval 4; saved iteration 4" in out
    assert _marker(tmp_path / "run") == 4 and "validation" not in out
    assert [r["iteration"] for r in read_metrics(tmp_path / "run.jsonl")] == [1, 2, 3, 4]

    trained = _main([*interval, "--load", tmp_path / "run"])
    assert "resuming at iteration 4" in capsys.readouterr().out
    evaluated = _main(
        [
            *MOCK,
            "--train-iters",
            6,
            "--skip-train",
            "--load",
            tmp_path / "run",
            "--metrics-file",
            tmp_path / "eval.jsonl",
        ]
    )
    out = capsys.readouterr().out
    assert f"final: validation at iteration 6 | lm loss {trained['lm_loss']:.4f}" in out
    assert evaluated == trained and "iter 1 |" not in out
    assert _final_validation(read_metrics(tmp_path / "eval.jsonl"))["lm_loss"] == trained["lm_loss"]

    assert (
        _main([*MOCK, "--train-iters", 6, "--save", tmp_path / "timed", "--exit-duration-in-mins", 1e-6])
        is None
    )
    assert (
        "exiting at iteration 1: the process ran for --exit-duration-in-mins 1e-06" in capsys.readouterr().out
    )
    assert _marker(tmp_path / "timed") == 1


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, capsys):
    """A real overflow: --lr 1e30 makes the first update blow the weights up, so every later
    gradient overflows to NaN. Those steps apply no update (weights, Adam moments and the LR
    schedule stay as after step 1), are counted and logged, and after
    --max-skipped-steps-in-a-row 3 the run saves and exits 1 with one clear message."""
    with pytest.raises(SystemExit) as stopped:
        _main(
            [
                *MOCK,
                "--train-iters",
                20,
                "--lr",
                1e30,
                "--clip-grad",
                0,
                "--max-skipped-steps-in-a-row",
                3,
                "--save",
                tmp_path,
                "--save-interval",
                1,
                "--metrics-file",
                tmp_path / "m.jsonl",
            ]
        )
    assert stopped.value.code == 1
    captured = capsys.readouterr()
    assert captured.err.count("pretrain_lcot.py: error:") == 1
    assert (
        "stopped at iteration 4: 3 steps in a row had a non-finite loss or grad norm "
        "(--max-skipped-steps-in-a-row 3)"
    ) in captured.err
    assert (
        "iteration 3: skipped the update (loss or grad norm not finite: grad norm nan); 2 in a row, 2 in all"
        in captured.out
    )
    grad_norms = [r["grad_norm"] for r in read_metrics(tmp_path / "m.jsonl")]
    assert grad_norms[0] > 0 and all(g != g for g in grad_norms[1:]) and len(grad_norms) == 4  # NaN != NaN
    assert _marker(tmp_path) == 4
    state = [
        torch.load(tmp_path / f"iter_000000{i}" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)
        for i in (1, 4)
    ]
    assert {
        k: state[1]["train_state"][k]
        for k in ("iteration", "consumed_train_samples", "skipped_steps_in_a_row", "skipped_steps_total")
    } == {"iteration": 4, "consumed_train_samples": 8, "skipped_steps_in_a_row": 3, "skipped_steps_total": 3}
    assert state[0]["opt_param_scheduler"]["num_steps"] == state[1]["opt_param_scheduler"]["num_steps"] == 1
    weights = [read_checkpoint_weights(tmp_path / f"iter_000000{i}", tmp_path) for i in (1, 4)]
    assert weights[0]["output_layer.weight"].abs().max() > 1e20  # the overflow is real
    assert all(torch.equal(tensor, weights[1][name]) for name, tensor in weights[0].items())
    moments = [nested_tensors(s["optimizer"]) for s in state]
    assert sum("exp_avg" in path for path in moments[0]) > 0 and moments[0].keys() == moments[1].keys()
    assert all(torch.equal(tensor, moments[1][path]) for path, tensor in moments[0].items())


def _worker_pids(launcher: subprocess.Popen) -> list:
    import psutil

    deadline = time.time() + 120
    while time.time() < deadline:
        children = [
            p
            for p in psutil.Process(launcher.pid).children(recursive=True)
            if any(arg.endswith("pretrain_lcot.py") for arg in p.cmdline())
        ]
        if len(children) == 2:
            ranks = {int(p.environ()["RANK"]): p.pid for p in children}
            return [ranks[0], ranks[1]]
        time.sleep(0.5)
    raise AssertionError("the two ranks did not start")


def _wait_for_line(path, text: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text():
            return
        assert process.poll() is None, path.read_text() if path.exists() else "no output"
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not seen in {path}")


@pytest.mark.slow
def test_exit_signal_on_one_rank_stops_both_and_resume_is_exact(tmp_path):
    """2 data-parallel ranks under torchrun with --exit-signal-handler: SIGUSR1 sent to rank 0
    alone (the other rank logs) makes both finish the step, save and exit 0. Resuming that
    checkpoint to iteration 12 reproduces a straight 2-rank run to 12 bit for bit (losses,
    validation, weights, Adam moments). Adaptive halting, real collectives, real signal."""
    flags = [
        str(f)
        for f in (
            *MOCK,
            "--global-batch-size",
            4,
            "--train-iters",
            12,
            "--latent-steps",
            2,
            "--halting",
            "adaptive",
            "--lr",
            3e-3,
        )
    ]
    straight = run_pretrain(
        [*flags, "--save", str(tmp_path / "straight"), "--metrics-file", str(tmp_path / "straight.jsonl")],
        cwd=tmp_path,
        launcher=TORCHRUN_2,
    )
    assert straight.returncode == 0, straight.stderr[-3000:]

    log = tmp_path / "stopped.out"
    with open(log, "w") as out:
        launcher = subprocess.Popen(
            [
                *TORCHRUN_2,
                PRETRAIN,
                *flags,
                "--save",
                str(tmp_path / "resumed"),
                "--metrics-file",
                str(tmp_path / "resumed.jsonl"),
                "--exit-signal-handler",
            ],
            cwd=tmp_path,
            env=tool_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            rank0, _ = _worker_pids(launcher)
            _wait_for_line(log, "iter 2 |", launcher)
            os.kill(rank0, signal.SIGUSR1)
            assert launcher.wait(timeout=300) == 0, log.read_text()[-3000:]
        finally:
            launcher.kill()
    stopped_at = _marker(tmp_path / "resumed")
    assert 2 <= stopped_at < 12
    assert (
        f"exiting at iteration {stopped_at}: an exit signal (SIGTERM or SIGUSR1) reached a rank"
        in log.read_text()
    )
    assert max(r["iteration"] for r in read_metrics(tmp_path / "resumed.jsonl")) == stopped_at

    resumed = run_pretrain(
        [
            *flags,
            "--save",
            str(tmp_path / "resumed"),
            "--load",
            str(tmp_path / "resumed"),
            "--metrics-file",
            str(tmp_path / "resumed.jsonl"),
        ],
        cwd=tmp_path,
        launcher=TORCHRUN_2,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at iteration {stopped_at}" in resumed.stdout

    def deterministic(record):
        return {k: v for k, v in record.items() if k not in ("tokens_per_sec", "elapsed_s", "eta_s")}

    assert [deterministic(r) for r in read_metrics(tmp_path / "resumed.jsonl")] == [
        deterministic(r) for r in read_metrics(tmp_path / "straight.jsonl")
    ]
    weights = [
        read_checkpoint_weights(tmp_path / run / "iter_0000012", tmp_path) for run in ("straight", "resumed")
    ]
    assert all(torch.equal(tensor, weights[1][name]) for name, tensor in weights[0].items())
    optimizer = [
        nested_tensors(
            torch.load(
                tmp_path / run / "iter_0000012" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True
            )["optimizer"]
        )
        for run in ("straight", "resumed")
    ]
    assert (
        sum("exp_avg_sq" in path for path in optimizer[0]) > 0 and optimizer[0].keys() == optimizer[1].keys()
    )
    assert all(torch.equal(tensor, optimizer[1][path]) for path, tensor in optimizer[0].items())


def _launch_rank(rank: int, port: int, flags: list, log) -> subprocess.Popen:
    env = {
        **tool_env(),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    return subprocess.Popen(
        [sys.executable, PRETRAIN, *map(str, flags)], env=env, stdout=log, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow
@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_a_dead_or_frozen_rank_makes_the_other_exit_with_an_error(tmp_path, fault):
    """Rank 1 is killed or stopped mid-run; rank 0 leaves its collective with an error naming
    --distributed-timeout-minutes (0.25 min here) instead of hanging: the timeout reaches
    megatron-core's data-parallel group, where the gradients are averaged."""
    from megatron_lcot.parallel import free_port

    flags = [*MOCK, "--global-batch-size", 4, "--train-iters", 100000, "--distributed-timeout-minutes", 0.25]
    port = free_port()
    logs = [open(tmp_path / f"rank{rank}.out", "w") for rank in range(2)]
    ranks = [_launch_rank(rank, port, flags, logs[rank]) for rank in range(2)]
    try:
        _wait_for_line(tmp_path / "rank1.out", "iter 3 |", ranks[1])
        os.kill(ranks[1].pid, fault)
        faulted = time.time()
        assert ranks[0].wait(timeout=240) == 1
        waited = time.time() - faulted
        output = (tmp_path / "rank0.out").read_text()
        assert "pretrain_lcot.py: error: rank 0: a collective with the other ranks failed" in output, output[
            -3000:
        ]
        assert f'File "{PRETRAIN}"' not in output
        if fault == signal.SIGSTOP:
            assert 10 < waited < 120, waited  # the timeout, not an instant failure nor a hang
    finally:
        for process in ranks:
            process.kill()
        for log in logs:
            log.close()


@pytest.mark.slow
def test_a_config_error_is_reported_once_not_per_rank(tmp_path):
    result = run_pretrain(
        [str(f) for f in (*MOCK, "--train-iters", 2, "--keep-last", 0, "--save", tmp_path)],
        cwd=tmp_path,
        launcher=TORCHRUN_2,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count("pretrain_lcot.py: error: --keep-last must be positive.") == 1, output[-3000:]
    assert f'File "{PRETRAIN}"' not in output  # torchrun prints its own traceback; ours prints none


@pytest.mark.slow
def test_tensor_parallel_checkpoint_reshards_and_evaluates_in_one_process(tmp_path, sotu_indexed_dataset):
    """A TP=2 adaptive run on real text; its final validation loss is reproduced in one process
    by --skip-train from (a) the TP=2 checkpoint itself, (b) its reshard to TP=1 (sharded) and
    (c) the same as plain torch files; a TP=2 plain reshard needs 2 processes and says so."""
    data = [
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
    ]
    flags = [
        *TINY_MODEL_FLAGS,
        *data,
        "--micro-batch-size",
        2,
        "--global-batch-size",
        4,
        "--train-iters",
        4,
        "--log-interval",
        1,
        "--eval-iters",
        2,
        "--eval-interval",
        100,
        "--latent-steps",
        2,
        "--halting",
        "adaptive",
        "--lr",
        3e-3,
    ]
    flags = [str(f) for f in flags]
    trained = run_pretrain(
        [
            *flags,
            "--tensor-model-parallel-size",
            "2",
            "--save",
            str(tmp_path / "tp2"),
            "--metrics-file",
            str(tmp_path / "tp2.jsonl"),
        ],
        cwd=tmp_path,
        launcher=TORCHRUN_2,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    want = _final_validation(read_metrics(tmp_path / "tp2.jsonl"))

    convert = [
        sys.executable,
        os.path.join(REPO_ROOT, "tools", "convert_checkpoint.py"),
        "reshard",
        "--load",
        str(tmp_path / "tp2"),
    ]
    for name, fmt in (("tp1", "sharded"), ("tp1_plain", "plain")):
        result = subprocess.run(
            [*convert, "--save", str(tmp_path / name), "--target-tensor-parallel-size", "1", "--format", fmt],
            env=tool_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(tmp_path / "tp1_plain" / "iter_0000004" / "mp_rank_00" / "model_optim_rng.pt")
    refused = subprocess.run(
        [
            *convert,
            "--save",
            str(tmp_path / "tp2_plain"),
            "--target-tensor-parallel-size",
            "2",
            "--format",
            "plain",
        ],
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert refused.returncode == 2
    assert "convert_checkpoint.py: error: the target layout TP 2 x PP 1 needs 2 processes" in refused.stderr

    for name in ("tp2", "tp1", "tp1_plain"):
        metrics = tmp_path / f"eval_{name}.jsonl"
        result = run_pretrain(
            [*flags, "--skip-train", "--load", str(tmp_path / name), "--metrics-file", str(metrics)],
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        got = _final_validation(read_metrics(metrics))
        assert got["iteration"] == 4
        assert got["lm_loss"] == pytest.approx(want["lm_loss"], rel=1e-5), name
        assert got["mean_latent_steps"] == pytest.approx(want["mean_latent_steps"], rel=1e-5), name


@pytest.mark.slow
def test_zero2_resume_is_exact_and_its_weights_evaluate_in_one_process(tmp_path):
    """DeepSpeed ZeRO-2 on 2 ranks (the real `deepspeed` launcher): 8 iterations straight
    against 4 + resume from the iteration-4 checkpoint (the engine's partitioned files plus our
    per-rank state) + 4, bit for bit; then the layout-free weights of the ZeRO-2 checkpoint,
    evaluated by --skip-train in one plain process, give the run's final validation loss."""
    from tests.distributed.test_data_parallel_equivalence import DS_CONFIGS, deepspeed_launcher

    flags = [
        str(f)
        for f in (
            *MOCK,
            "--global-batch-size",
            4,
            "--train-iters",
            8,
            "--latent-steps",
            2,
            "--halting",
            "adaptive",
            "--lr",
            3e-3,
        )
    ]
    zero2 = [
        "--deepspeed",
        "--deepspeed_config",
        os.path.join(DS_CONFIGS, "zero2.json"),
        "--save-interval",
        "4",
    ]
    for name, extra in (("straight", []), ("resumed", ["--load", str(tmp_path / "resumed")])):
        if name == "resumed":
            shutil.copytree(tmp_path / "straight" / "iter_0000004", tmp_path / "resumed" / "iter_0000004")
            (tmp_path / "resumed" / "latest_checkpointed_iteration.txt").write_text("4")
        result = run_pretrain(
            [
                *flags,
                *zero2,
                *extra,
                "--save",
                str(tmp_path / name),
                "--metrics-file",
                str(tmp_path / f"{name}.jsonl"),
            ],
            cwd=tmp_path,
            launcher=deepspeed_launcher(2),
            timeout=900,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isdir(tmp_path / "straight" / "iter_0000004" / "deepspeed")

    def deterministic(record):
        return {k: v for k, v in record.items() if k not in ("tokens_per_sec", "elapsed_s", "eta_s")}

    straight = [deterministic(r) for r in read_metrics(tmp_path / "straight.jsonl")]
    assert [deterministic(r) for r in read_metrics(tmp_path / "resumed.jsonl")] == [
        r for r in straight if r["split"] == "valid" or r["iteration"] > 4
    ]
    weights = [
        read_checkpoint_weights(tmp_path / run / "iter_0000008", tmp_path) for run in ("straight", "resumed")
    ]
    assert all(torch.equal(tensor, weights[1][name]) for name, tensor in weights[0].items())

    evaluated = run_pretrain(
        [
            *flags,
            "--skip-train",
            "--load",
            str(tmp_path / "straight"),
            "--metrics-file",
            str(tmp_path / "eval.jsonl"),
        ],
        cwd=tmp_path,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    got, want = (_final_validation(read_metrics(tmp_path / f"{run}.jsonl")) for run in ("eval", "straight"))
    assert got["iteration"] == 8 and got["lm_loss"] == pytest.approx(want["lm_loss"], rel=1e-5)
