"""`--deepspeed` flags and configs: what reaches deepspeed.initialize, and what is refused (with
a message naming the flag or the file's key and the fix) before any process group exists."""

from __future__ import annotations

import json
import os

import pytest

from megatron_lcot.arguments import ArgumentError, parse_args
from megatron_lcot.parallel.deepspeed_config import effective_config
from megatron_lcot.run_config import RunConfig
from tests.conftest import REPO_ROOT, TINY_MODEL_FLAGS

BASE = [*TINY_MODEL_FLAGS, "--train-iters", "2", "--mock-data", "--vocab-size", "100"]
ZERO2 = os.path.join(REPO_ROOT, "examples", "ds_configs", "zero2.json")


def _config_file(tmp_path, config: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture
def two_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")


def test_effective_config_takes_batch_clipping_and_stage_from_the_flags(two_ranks):
    args = parse_args(
        [
            *BASE,
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "8",
            "--clip-grad",
            "0",
            "--deepspeed",
            "--deepspeed_config",
            ZERO2,
            "--zero-stage",
            "3",
        ]
    )
    config = effective_config(RunConfig.from_values(args))
    assert config["zero_optimization"]["stage"] == 3 and config["zero_optimization"]["overlap_comm"] is True
    assert config["gradient_clipping"] == 0.0  # not DeepSpeed's default 1.0
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"]) == (2, 4)
    assert config["gradient_accumulation_steps"] == 1 and config["managed_gradient_accumulation"] is False
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False
    assert config["fp16"]["initial_scale_power"] == 16  # the file's loss-scaling knobs are kept


def test_stage_override_below_2_turns_off_overlap_comm(two_ranks):
    """zero2.json's overlap_comm with --zero-stage 1: DeepSpeed refuses overlap_comm below stage
    2 without managed accumulation ("supports ZeRO overlap_comm only with ZeRO stage 2")."""
    args = parse_args([*BASE, "--deepspeed", "--deepspeed_config", ZERO2, "--zero-stage", "1"])
    assert effective_config(RunConfig.from_values(args))["zero_optimization"] == {
        **_file_zero(ZERO2),
        "stage": 1,
        "overlap_comm": False,
    }


def _file_zero(path: str) -> dict:
    with open(path) as f:
        return json.load(f)["zero_optimization"]


@pytest.mark.parametrize("stage", [2, 3])
def test_pipeline_parallel_with_zero_2_or_3_is_refused(two_ranks, stage):
    with pytest.raises(ArgumentError) as error:
        parse_args(
            [
                *BASE,
                "--pipeline-model-parallel-size",
                "2",
                "--deepspeed",
                "--deepspeed_config",
                ZERO2,
                "--zero-stage",
                str(stage),
            ]
        )
    for text in (
        f"ZeRO stage {stage}",
        "--pipeline-model-parallel-size 2",
        "--zero-stage 1",
        "--use-distributed-optimizer",
    ):
        assert text in str(error.value)


REFUSED = {
    "zero_stage_0": (["--deepspeed_config", ZERO2, "--zero-stage", "0"], "drop --deepspeed"),
    "pipeline_with_latent_steps": (
        [
            "--deepspeed_config",
            ZERO2,
            "--zero-stage",
            "1",
            "--latent-steps",
            "1",
            "--pipeline-model-parallel-size",
            "2",
            "--global-batch-size",
            "4",
        ],
        "vanilla models only",
    ),
    "no_config": ([], "--deepspeed needs --deepspeed_config FILE"),
    "missing_file": (["--deepspeed_config", "/nonexistent/ds.json"], "no such file"),
    "with_distributed_optimizer": (
        ["--deepspeed_config", ZERO2, "--use-distributed-optimizer"],
        "use --zero-stage 1",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
def test_bad_deepspeed_flags_are_refused(case, two_ranks):
    extra, message = REFUSED[case]
    with pytest.raises(ArgumentError, match=message):
        parse_args([*BASE, "--deepspeed", *extra])


def test_zero_stage_without_deepspeed_is_refused():
    with pytest.raises(ArgumentError, match="need --deepspeed"):
        parse_args([*BASE, "--zero-stage", "2"])


BAD_FILES = {
    "optimizer_section": ({"optimizer": {"type": "AdamW"}}, "remove the 'optimizer' section"),
    "other_clipping": ({"gradient_clipping": 1.0}, "sets gradient_clipping 1.0 but --clip-grad is 0.5"),
    "accumulation": ({"gradient_accumulation_steps": 4}, "drop gradient_accumulation_steps"),
    "bf16_without_flag": ({"bf16": {"enabled": True}}, "enables bf16; pass --bf16"),
    "no_grad_norm": (
        {"zero_optimization": {"stage": 2, "compute_grad_norm": False}},
        "drop zero_optimization.compute_grad_norm false",
    ),
    "bf16_accumulation": (
        {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "bf16"}},
        "sets data_types.grad_accum_dtype 'bf16'; under --bf16 gradients are accumulated and reduced in fp32",
    ),
    "bf16_reduction": (
        {"bf16": {"enabled": True}, "communication_data_type": "bf16"},
        "sets communication_data_type 'bf16'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES), ids=list(BAD_FILES))
def test_configs_that_contradict_the_flags_are_refused(tmp_path, case):
    config, message = BAD_FILES[case]
    with pytest.raises(ArgumentError, match=message):
        precision = ["--bf16"] if case in ("bf16_accumulation", "bf16_reduction") else []
        parse_args(
            [
                *BASE,
                *precision,
                "--clip-grad",
                "0.5",
                "--deepspeed",
                "--deepspeed_config",
                _config_file(tmp_path, config),
            ]
        )


@pytest.mark.parametrize("name", ["zero1.json", "zero2.json", "zero3.json", "zero3_offload.json"])
def test_bf16_accumulates_and_reduces_gradients_in_fp32(two_ranks, name):
    """As megatron-core's DDP (grad_reduce_in_fp32): the shipped configs say so, and the
    generated config says so under --bf16 even for a file that does not."""
    path = os.path.join(REPO_ROOT, "examples", "ds_configs", name)
    with open(path) as f:
        shipped = json.load(f)
    assert (
        shipped["data_types"] == {"grad_accum_dtype": "fp32"} and shipped["communication_data_type"] == "fp32"
    )
    config = effective_config(
        RunConfig.from_values(parse_args([*BASE, "--bf16", "--deepspeed", "--deepspeed_config", path]))
    )
    assert config["data_types"]["grad_accum_dtype"] == config["communication_data_type"] == "fp32"
    assert config["bf16"]["enabled"] is True


def test_bf16_without_accumulation_keys_in_the_file_gets_fp32_accumulation(two_ranks, tmp_path):
    path = _config_file(tmp_path, {"zero_optimization": {"stage": 2}})
    config = effective_config(
        RunConfig.from_values(parse_args([*BASE, "--bf16", "--deepspeed", "--deepspeed_config", path]))
    )
    assert (
        config["data_types"] == {"grad_accum_dtype": "fp32"} and config["communication_data_type"] == "fp32"
    )


def test_unreadable_config_is_refused_by_the_flag_check(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{ not json")
    with pytest.raises(ArgumentError, match="cannot read it as JSON"):
        parse_args([*BASE, "--deepspeed", "--deepspeed_config", str(path)])
