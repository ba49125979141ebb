"""Convert checkpoints: to Hugging Face, from Hugging Face, between parallel layouts.

    python tools/convert_checkpoint.py to-hf   --load CKPT_DIR --output HF_DIR [--iteration N] [--max-shard-size 5GB] \
        [--eval-result EVAL.json] [--metrics-file METRICS.jsonl]
    python tools/convert_checkpoint.py from-hf --load HF_DIR --save CKPT_DIR [--latent-steps K ...]
    torchrun --nproc-per-node TP*PP tools/convert_checkpoint.py from-hf --load HF_DIR --save CKPT_DIR \
        --target-tensor-parallel-size TP --target-pipeline-parallel-size PP
    python tools/convert_checkpoint.py reshard --load CKPT_DIR --save CKPT_DIR \
        --target-tensor-parallel-size N --target-pipeline-model-parallel-size M [--format sharded|plain]

A thin dispatcher: each subcommand is one module with `add_arguments(parser)` and `run(args)`,
listed in SUBCOMMANDS. User mistakes print `convert_checkpoint.py: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "to-hf": ("megatron_lcot.hf.export", "export a checkpoint as a Hugging Face model directory"),
    "from-hf": ("megatron_lcot.hf.import_llama", "start a checkpoint from a Hugging Face Llama model"),
    "reshard": ("megatron_lcot.checkpoint.reshard", "write a checkpoint's weights at another TP/PP layout"),
}


def main(argv: list | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    commands = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        modules[name] = importlib.import_module(module_name)
        modules[name].add_arguments(commands.add_parser(name, help=help_text, allow_abbrev=False))
    args = parser.parse_args(argv)
    from megatron_lcot.hf.errors import ConversionError
    from megatron_lcot.inference.loading import USER_ERRORS

    try:
        result = modules[args.command].run(args)
    except (ConversionError, *USER_ERRORS) as error:
        print(f"convert_checkpoint.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    if result is not None:  # a multi-process subcommand reports on one rank
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
