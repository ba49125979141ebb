"""The DeepSpeed JSON config a run uses: the user's file with our flags written over it.

Megatron-DeepSpeed's convention: the file says *how* to shard (ZeRO stage, offload, bucket
sizes, loss-scaling knobs); the batch sizes, clipping and precision come from the Megatron
flags, because the training loop and the model are built from those. Values the file gives
that contradict a flag are refused (a silent override is how `gradient_clipping`'s default
1.0 surprises people).

Two settings are forced, both measured (docs/architecture.md, "DeepSpeed"): megatron-core's
schedule accumulates the micro-batches of a global batch itself, so DeepSpeed sees one
micro-batch per step (`gradient_accumulation_steps` 1) and does not manage accumulation
(`managed_gradient_accumulation` false: its managed mode is silently wrong under the schedule).
Under `--bf16` gradients are accumulated and reduced in fp32 (`data_types.grad_accum_dtype`,
`communication_data_type`), as megatron-core's DDP does (`grad_reduce_in_fp32`); the grad norm
is always computed, since the loop logs it and skips steps where it is not finite.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_lcot.run_config import RunConfig


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed config that cannot drive this run; the message names the file and the key."""


# Keys our flags own: the file may repeat them only with the same value.
_OWNED_BY_FLAGS = {
    "gradient_clipping": "--clip-grad",
    "train_micro_batch_size_per_gpu": "--micro-batch-size",
}


def read_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise DeepSpeedConfigError(
            f"--deepspeed_config {path!r}: cannot read it as JSON ({error})."
        ) from error
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(f"--deepspeed_config {path!r}: expected a JSON object.")
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise DeepSpeedConfigError(
                f"--deepspeed_config {path!r}: remove the {key!r} section; the optimizer and LR schedule "
                "come from the Megatron flags (--lr, --adam-beta1, --lr-decay-style, ...)."
            )
    return config


def run_zero_stage(parallel_flags) -> int | None:
    """The ZeRO stage of a run (None without `--deepspeed`: megatron-core DDP), the one reading
    of it for the engine config, the checkpoint's engine name and the memory estimate.
    `parallel_flags`: the parsed flags or the RunConfig's parallel section (`deepspeed`,
    `deepspeed_config`, `zero_stage`)."""
    if not getattr(parallel_flags, "deepspeed", False):
        return None
    return zero_stage_of(parallel_flags.deepspeed_config, parallel_flags.zero_stage)


def zero_stage_of(path: str, override: int | None) -> int:
    """The ZeRO stage a run will use: `--zero-stage` when given, else the file's (default 0)."""
    stage = read_config(path).get("zero_optimization", {}).get("stage", 0) if override is None else override
    if stage not in (0, 1, 2, 3):
        raise DeepSpeedConfigError(
            f"--deepspeed_config {path!r}: zero_optimization.stage {stage!r} is not 0-3."
        )
    return stage


def _check_precision(config: dict, path: str, section: str, flag_set: bool) -> None:
    if config.get(section, {}).get("enabled", False) and not flag_set:
        raise DeepSpeedConfigError(
            f"--deepspeed_config {path!r} enables {section}; pass --{section} as well "
            "(the model is built in that precision) or disable it in the file."
        )


def effective_config(run_config: RunConfig) -> dict:
    """The config handed to `deepspeed.initialize` for this run."""
    path = run_config.parallel.deepspeed_config
    config = read_config(path)
    wanted = {
        "gradient_clipping": run_config.optimizer.clip_grad,
        "train_micro_batch_size_per_gpu": run_config.training.micro_batch_size,
    }
    for key, flag in _OWNED_BY_FLAGS.items():
        if key in config and config[key] != wanted[key]:
            raise DeepSpeedConfigError(
                f"--deepspeed_config {path!r} sets {key} {config[key]} but {flag} is "
                f"{wanted[key]}; drop {key} from the file (the flag sets it)."
            )
    for key in ("gradient_accumulation_steps", "train_batch_size"):
        if key in config:
            raise DeepSpeedConfigError(
                f"--deepspeed_config {path!r}: drop {key}; --global-batch-size sets the "
                "accumulation (megatron-core's schedule accumulates micro-batches)."
            )
    _check_precision(config, path, "bf16", run_config.model.bf16)
    _check_precision(config, path, "fp16", run_config.model.fp16)
    if config.get("zero_optimization", {}).get("compute_grad_norm", True) is not True:
        raise DeepSpeedConfigError(
            f"--deepspeed_config {path!r}: drop zero_optimization.compute_grad_norm false; "
            "the grad norm is logged and decides whether a step is applied."
        )
    for key, value in (
        ("data_types.grad_accum_dtype", config.get("data_types", {}).get("grad_accum_dtype")),
        ("communication_data_type", config.get("communication_data_type")),
    ):
        if run_config.model.bf16 and value not in (None, "fp32"):
            raise DeepSpeedConfigError(
                f"--deepspeed_config {path!r} sets {key} {value!r}; under --bf16 gradients "
                'are accumulated and reduced in fp32 (set it to "fp32" or drop it).'
            )
    config.update(wanted)
    config.update(
        {
            "train_batch_size": run_config.training.micro_batch_size * run_config.parallel.data_parallel_size,
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,
            "zero_allow_untested_optimizer": True,  # the client optimizer is torch's AdamW
            "zero_force_ds_cpu_optimizer": False,
            "bf16": {**config.get("bf16", {}), "enabled": run_config.model.bf16},
            "fp16": {**config.get("fp16", {}), "enabled": run_config.model.fp16},
        }
    )
    if run_config.model.bf16:
        config["data_types"] = {**config.get("data_types", {}), "grad_accum_dtype": "fp32"}
        config["communication_data_type"] = "fp32"
    if run_config.model.fp16 and run_config.optimizer.loss_scale is not None:
        config["fp16"]["loss_scale"] = run_config.optimizer.loss_scale
    config.setdefault("steps_per_print", 2**31 - 1)  # our logger prints; DeepSpeed's would repeat it
    zero = {**config.get("zero_optimization", {}), "stage": run_zero_stage(run_config.parallel)}
    if zero["stage"] < 2:
        # overlap_comm overlaps the gradient reduce-scatter of stages 2/3; below stage 2 DeepSpeed
        # refuses it without managed accumulation (zero2.json run with --zero-stage 1).
        zero["overlap_comm"] = False
    config["zero_optimization"] = zero
    return config
