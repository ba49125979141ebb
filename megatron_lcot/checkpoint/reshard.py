"""Checkpoints to another tensor/pipeline layout, through megatron-core's dist_checkpointing.

The weights of a training checkpoint are a dist_checkpointing directory, which any layout
loads (or, under ZeRO-3, DeepSpeed's partitions, consolidated in one process): resharding is
"build the model at the target layout from the checkpoint's flags, load, write". Nothing here
slices tensors by hand. The output is a weights-only checkpoint (the optimizer state belongs to
the old layout), either sharded (dist_checkpointing again) or plain
(one `torch.save` file per model-parallel rank, Megatron-LM's legacy layout).

Run with as many processes as the target layout has model-parallel ranks
(`torchrun --nproc-per-node TP*PP tools/convert_checkpoint.py reshard ...`; one plain process
for TP = PP = 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from megatron.core import parallel_state

from megatron_lcot import parallel
from megatron_lcot.checkpoint.checkpointing import (
    CheckpointError,
    load_model_weights,
    load_run_config,
    save_weights_only,
)
from megatron_lcot.model.building import build_model
from megatron_lcot.run_config import RunConfig


def target_config(saved: RunConfig, tensor_parallel: int, pipeline_parallel: int) -> RunConfig:
    """The checkpoint's RunConfig at the target layout. The vocabulary keeps the checkpoint's
    padding (the embedding's shape) when the target TP divides it."""
    model = saved.model
    if model.padded_vocab_size % tensor_parallel:
        raise CheckpointError(
            f"--target-tensor-parallel-size {tensor_parallel} does not divide the checkpoint's "
            f"padded vocabulary {model.padded_vocab_size}; choose a divisor of it."
        )
    if model.num_attention_heads % tensor_parallel or model.num_query_groups % tensor_parallel:
        raise CheckpointError(
            f"--target-tensor-parallel-size {tensor_parallel} must divide the checkpoint's "
            f"{model.num_attention_heads} heads and {model.num_query_groups} query groups."
        )
    if model.num_layers % pipeline_parallel or (pipeline_parallel > 1 and model.latent_steps > 0):
        raise CheckpointError(
            f"--target-pipeline-model-parallel-size {pipeline_parallel}: the checkpoint's "
            f"{model.num_layers} layers must divide evenly, and latent modes need 1."
        )
    layout = dataclasses.replace(
        saved.parallel,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
    )
    return dataclasses.replace(saved, parallel=layout)


def reshard(
    load_dir: str,
    save_dir: str,
    tensor_parallel: int,
    pipeline_parallel: int,
    sharded: bool,
    iteration: int | None = None,
    as_initial_weights: bool = False,
) -> str:
    """Write `load_dir`'s weights (iteration: default the marker's) to `save_dir` at the
    target layout; returns the written iteration directory. Collective over TP x PP ranks.
    `as_initial_weights`: write them as iteration 0, the starting point a training run with
    `--load save_dir` takes (a new optimizer, under any engine)."""
    config = target_config(load_run_config(load_dir, iteration), tensor_parallel, pipeline_parallel)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != tensor_parallel * pipeline_parallel:
        raise CheckpointError(
            f"the target layout TP {tensor_parallel} x PP {pipeline_parallel} needs "
            f"{tensor_parallel * pipeline_parallel} processes, this run has {world_size}; "
            f"launch with torchrun --nproc-per-node {tensor_parallel * pipeline_parallel}."
        )
    parallel.initialize(tensor_parallel, pipeline_parallel, config.model.seed)
    model = build_model(
        config.model,
        tensor_parallel,
        pipeline_parallel,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    iteration = load_model_weights(load_dir, model, iteration)
    return save_weights_only(save_dir, 0 if as_initial_weights else iteration, model, config, sharded=sharded)


def add_arguments(command: argparse.ArgumentParser) -> None:
    """The `reshard` subcommand's flags (tools/convert_checkpoint.py)."""
    command.add_argument("--load", required=True, help="checkpoint directory (pretrain_lcot.py --save)")
    command.add_argument("--save", required=True, help="directory to write the resharded checkpoint to")
    command.add_argument("--target-tensor-parallel-size", type=int, default=1)
    command.add_argument("--target-pipeline-model-parallel-size", type=int, default=1)
    command.add_argument("--iteration", type=int, default=None, help="default: the one the marker names")
    command.add_argument(
        "--format",
        choices=("sharded", "plain"),
        default="sharded",
        help="sharded: dist_checkpointing (loads at any layout); plain: one torch file "
        "per model-parallel rank of the target layout",
    )
    command.add_argument(
        "--as-initial-weights",
        action="store_true",
        help="write the weights as iteration 0: a training run with --load SAVE starts from "
        "them with a new optimizer (e.g. after changing --deepspeed, the ZeRO stage or "
        "--use-distributed-optimizer)",
    )


def run(options: argparse.Namespace) -> dict | None:
    """Reshard; returns what was written (on global rank 0; None on the others)."""
    for flag in ("target_tensor_parallel_size", "target_pipeline_model_parallel_size"):
        if getattr(options, flag) < 1:
            raise CheckpointError(f"--{flag.replace('_', '-')} must be >= 1.")
    written = reshard(
        options.load,
        options.save,
        options.target_tensor_parallel_size,
        options.target_pipeline_model_parallel_size,
        options.format == "sharded",
        options.iteration,
        options.as_initial_weights,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    return {
        "save": written,
        "tensor_model_parallel_size": options.target_tensor_parallel_size,
        "pipeline_model_parallel_size": options.target_pipeline_model_parallel_size,
        "format": options.format,
    }
