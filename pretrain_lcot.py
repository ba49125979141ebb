"""Pretrain a latent-thought GPT (megatron-core), shaped as Megatron-LM's pretrain_gpt.py.

    python pretrain_lcot.py --num-layers 2 --hidden-size 64 --num-attention-heads 4 \
        --seq-length 64 --micro-batch-size 4 --train-iters 50 --mock-data --vocab-size 1024 \
        --latent-steps 2 --halting adaptive --log-interval 10 --metrics-file metrics.jsonl

Also runs under `torchrun --nproc-per-node N` and the `deepspeed` launcher. See
docs/training.md for every flag.
"""

from __future__ import annotations

import os
import sys
import warnings
from functools import partial

# megatron-core warns that the optional Apex / Transformer Engine kernels are absent (the local
# implementations are what we use on purpose) and that its own default CUDA-graph scope is
# deprecated (we use no CUDA graphs).
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed")
warnings.filterwarnings("ignore", message="full scope is deprecated")

from megatron_lcot import parallel  # noqa: E402
from megatron_lcot.arguments import USAGE_ERROR_EXIT_CODE, ArgumentError, parse_args, set_padded_vocab_size  # noqa: E402
from megatron_lcot.checkpoint.checkpointing import CheckpointError, CheckpointSaveError  # noqa: E402
from megatron_lcot.data.tokenizers import TokenizerError, build_tokenizer  # noqa: E402
from megatron_lcot.run_config import RunConfig  # noqa: E402
from megatron_lcot.training.faults import (
    TooManySkippedSteps,
    describe_collective_failure,  # noqa: E402
    record_first_failure,
)
from megatron_lcot.training.loop import pretrain  # noqa: E402
from megatron_lcot.training.providers import forward_step, model_provider, train_valid_test_datasets_provider  # noqa: E402


def _fail(message: str, exit_code: int, every_rank: bool = False) -> None:
    """Print `pretrain_lcot.py: error: ...` and exit. Errors that every rank meets alike (flags,
    files, a run stopped by its own rule) are printed by rank 0 only, not once per rank."""
    rank = int(os.environ.get("RANK", "0"))
    if every_rank or rank == 0:
        print(f"pretrain_lcot.py: error: {message}", file=sys.stderr, flush=True)
    sys.exit(exit_code)


def main(argv: list | None = None) -> dict | None:
    try:
        args = parse_args(argv)
        tokenizer = build_tokenizer(
            args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file, args.vocab_size
        )
        set_padded_vocab_size(args, tokenizer.vocab_size)
        return pretrain(
            RunConfig.from_values(args),
            partial(train_valid_test_datasets_provider, tokenizer),
            model_provider,
            forward_step,
        )
    except (ArgumentError, TokenizerError, CheckpointError) as error:
        _fail(str(error), USAGE_ERROR_EXIT_CODE)
    except (TooManySkippedSteps, CheckpointSaveError) as error:
        _fail(str(error), 1)
    except Exception as error:
        if not parallel.is_collective_failure(error):
            record_first_failure(error)  # the other ranks name it when their collectives fail
            raise
        _fail(describe_collective_failure(error), 1, every_rank=True)


if __name__ == "__main__":
    main()
