"""examples/compare_small.py's command lines: the schedule of a run scales with its iterations
(LR warm-up, validation interval, the adaptive recipe's halting warm-up), and every iso-FLOP model's
command line at the ~125M-parameter "gpu" scale passes pretrain_lcot.py's own argument validation
on this CPU (what `--dry-run` checks before a GPU is spent)."""

from __future__ import annotations

import os
import sys

import pytest

from megatron_lcot.arguments import ArgumentError, parse_args
from tests.conftest import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "examples"))

import compare_small  # noqa: E402


def _value(flags: list, name: str) -> str:
    return flags[len(flags) - 1 - flags[::-1].index(name) + 1]  # the last occurrence wins, as in argparse


@pytest.mark.parametrize(
    "iters, lr_warmup, eval_interval, halting_warmup", [(150, 10, 30, 24), (600, 40, 120, 96)]
)
def test_warmups_scale_with_the_runs_iterations(iters, lr_warmup, eval_interval, halting_warmup):
    scale = compare_small.SCALES["cpu"]
    flags = compare_small.run_flags("adaptive_k3", 2, scale, compare_small.common_flags(scale, None), iters)
    assert _value(flags, "--train-iters") == str(iters)
    assert _value(flags, "--lr-warmup-iters") == str(lr_warmup)
    assert _value(flags, "--eval-interval") == str(eval_interval)
    assert _value(flags, "--halting-warmup-iters") == str(halting_warmup)
    assert _value(flags, "--seed") == "2"


def test_gpu_scale_iso_flops_command_lines_pass_validation():
    scale = compare_small.SCALES["gpu"]
    for name in compare_small.ISO_FLOPS_MODELS:
        args = parse_args(
            compare_small.run_flags(name, 1, scale, compare_small.common_flags(scale, None), 500)
        )
        assert (args.num_layers, args.hidden_size, args.seq_length, args.bf16) == (12, 768, 1024, True)
        assert args.latent_steps == {"vanilla": 0, "ponderlm2_k1": 1, "adaptive_k3": 3}[name]
        assert args.train_iters == 500


def test_a_bad_scale_flag_fails_validation_naming_it():
    scale = dict(compare_small.SCALES["gpu"])
    scale["model"] = scale["model"].replace("--num-attention-heads 12", "--num-attention-heads 7")
    with pytest.raises(ArgumentError, match="--num-attention-heads"):
        parse_args(compare_small.run_flags("vanilla", 1, scale, compare_small.common_flags(scale, None), 500))


def test_runs_of_one_model_and_seed_at_different_budgets_get_their_own_directories():
    names = {compare_small.run_dir_name("vanilla", 1, iters, 150) for iters in (150, 300, 600)}
    assert names == {"vanilla_s1", "vanilla_s1_i300", "vanilla_s1_i600"}
