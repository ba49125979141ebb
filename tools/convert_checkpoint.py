"""Convert checkpoints: one subcommand per conversion.

    python tools/convert_checkpoint.py reshard --load ckpt --save ckpt_tp1 \
        --target-tensor-parallel-size 1 --target-pipeline-model-parallel-size 1
    torchrun --nproc-per-node 2 tools/convert_checkpoint.py reshard --load ckpt --save ckpt_tp2 \
        --target-tensor-parallel-size 2 --format plain

Each subcommand registers itself through an `add_*_command(subcommands)` function of the
package and sets `run`; errors in the input print `convert_checkpoint.py: error: ...` and exit 2.
"""

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed")

from megatron_lcot.arguments import USAGE_ERROR_EXIT_CODE  # noqa: E402
from megatron_lcot.training.checkpointing import CheckpointError  # noqa: E402
from megatron_lcot.training.reshard import add_reshard_command  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    subcommands = parser.add_subparsers(dest="command", required=True)
    add_reshard_command(subcommands)
    return parser


def main(argv: list | None = None) -> None:
    options = build_parser().parse_args(argv)
    try:
        options.run(options)
    except CheckpointError as error:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"convert_checkpoint.py: error: {error}", file=sys.stderr)
        sys.exit(USAGE_ERROR_EXIT_CODE)


if __name__ == "__main__":
    main()
