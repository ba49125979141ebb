"""Per-GPU memory of pretrain_lcot.py flags, from the memory model (model/memory.py).

    python -m megatron_lcot.training.memory_estimate --example [--gpus 8] [--json]
    python -m megatron_lcot.training.memory_estimate --num-layers 24 --hidden-size 1024 ... [--gpus N]

The model itself reads no flags; this module turns parsed flags into a RunConfig, its TrainingShape, and
prints the estimate (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from dataclasses import asdict

from megatron_lcot.arguments import parse_args, set_padded_vocab_size
from megatron_lcot.model.memory import DEFAULT_VOCAB_SIZE, TrainingShape, memory_estimate
from megatron_lcot.parallel.deepspeed_config import run_zero_stage
from megatron_lcot.run_config import RunConfig


def shape_of(config: RunConfig, gpus: int, device: str = "cuda") -> TrainingShape:
    """The TrainingShape of a run on `gpus` GPUs."""
    model, training, layout = config.model, config.training, config.parallel
    tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    dp = max(1, gpus // (tp * pp))
    global_batch = training.global_batch_size or training.micro_batch_size * dp
    return TrainingShape(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        seq_length=model.seq_length,
        micro_batch_size=training.micro_batch_size,
        vocab_size=model.padded_vocab_size,
        latent_steps=model.latent_steps,
        latent_layout=model.latent_layout,
        halting=model.halting,
        jacobi_iters=max(model.jacobi_iters),
        bf16=model.bf16 or model.fp16,
        tensor_parallel=tp,
        pipeline_parallel=pp,
        data_parallel=dp,
        num_microbatches=max(1, global_batch // (training.micro_batch_size * dp)),
        zero_stage=run_zero_stage(layout),
        distributed_optimizer=layout.use_distributed_optimizer,
        recompute=model.latent_recompute,
        attention_backend=model.core_attention_backend,
        device=device,
    )


def example_flags(root: str) -> list:
    """The pretrain_lcot.py flags examples/pretrain_common.sh builds with its defaults (plus the
    single-node script's --deepspeed and DS_CONFIG)."""
    script = (
        f"source {shlex.quote(os.path.join(root, 'examples', 'pretrain_common.sh'))}; "
        'echo $MODEL_ARGS $TRAIN_ARGS $PARALLEL_ARGS --deepspeed --deepspeed_config "$DS_CONFIG"'
    )
    text = subprocess.run(["bash", "-c", script], check=True, capture_output=True, text=True).stdout
    return shlex.split(text)


def format_estimate(estimate: dict) -> str:
    gib = 2**30
    rows = [("parameters (per GPU)", f"{estimate['parameters'] / 1e6:,.0f} M")]
    rows += [
        (name, f"{estimate[name] / gib:,.2f} GiB")
        for name in ("weights", "gradients", "optimizer", "activations", "transient", "peak")
    ]
    rows += [
        (f"  activations: {name}", f"{value / gib:,.2f} GiB")
        for name, value in estimate["activation_parts"].items()
        if name != "total"
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:>12}" for name, value in rows)


def estimate_for_flags(flags: list, gpus: int, device: str = "cuda") -> tuple:
    """(TrainingShape, memory_estimate) of pretrain_lcot.py `flags` on `gpus` GPUs; data flags
    are optional (memory does not depend on the data), --vocab-size defaults to the example's."""
    if "--data-path" not in flags and "--mock-data" not in flags:
        flags = [*flags, "--mock-data"]
    if "--vocab-size" not in flags:
        flags = [*flags, "--vocab-size", str(DEFAULT_VOCAB_SIZE)]
    args = parse_args(flags)
    set_padded_vocab_size(args, args.vocab_size)
    shape = shape_of(RunConfig.from_values(args), gpus, device)
    return shape, memory_estimate(shape)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--example", action="store_true", help="the defaults of examples/pretrain_common.sh")
    parser.add_argument(
        "--gpus", type=int, default=8, help="GPUs of the run (data parallel = gpus / (TP PP))"
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    ours, flags = parser.parse_known_args(argv)
    if ours.example:
        flags = (
            example_flags(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
            + flags
        )
    shape, estimate = estimate_for_flags(flags, ours.gpus, ours.device)
    if ours.json:
        print(json.dumps({"shape": asdict(shape), **estimate}))
    else:
        print(format_estimate(estimate))


if __name__ == "__main__":
    main(sys.argv[1:])
