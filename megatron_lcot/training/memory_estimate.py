"""Per-GPU memory of pretrain_lcot.py flags, from the memory model (model/memory.py).

    python -m megatron_lcot.training.memory_estimate --example [--gpus 8] [--json]
    python -m megatron_lcot.training.memory_estimate --num-layers 24 --hidden-size 1024 ... [--gpus N]

The model itself reads no flags; this module turns parsed flags into its TrainingShape and
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


def shape_from_args(args, gpus: int, vocab_size: int, device: str = "cuda") -> TrainingShape:
    """The TrainingShape of parsed pretrain_lcot.py flags on `gpus` GPUs."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    dp = max(1, gpus // (tp * pp))
    global_batch = args.global_batch_size or args.micro_batch_size * dp
    return TrainingShape(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        vocab_size=vocab_size,
        latent_steps=args.latent_steps,
        latent_layout=args.latent_layout,
        halting=args.halting,
        jacobi_iters=max(args.jacobi_iters),
        bf16=args.bf16 or args.fp16,
        tensor_parallel=tp,
        pipeline_parallel=pp,
        data_parallel=dp,
        num_microbatches=max(1, global_batch // (args.micro_batch_size * dp)),
        zero_stage=run_zero_stage(args),
        distributed_optimizer=args.use_distributed_optimizer,
        recompute=args.latent_recompute,
        attention_backend=args.core_attention_backend,
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
    shape = shape_from_args(args, gpus, args.padded_vocab_size, device)
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
