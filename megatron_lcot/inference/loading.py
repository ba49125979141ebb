"""A trained checkpoint as a one-process model in eval mode, with its flags and tokenizer.

The seam every inference tool uses (export, generation, evaluation): the flags come from
`checkpointing.saved_args`, the model from `providers.model_provider`, the weights from
`checkpointing.load_model_weights`. The model is built on one process (tensor and pipeline
size 1) whatever layout the checkpoint was trained with.
"""

from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import dataclass

import torch

from megatron_lcot import parallel
from megatron_lcot.data.tokenizers import LcotTokenizer, TokenizerError, build_tokenizer
from megatron_lcot.checkpoint.checkpointing import CheckpointError, load_model_weights, saved_args
from megatron_lcot.training.providers import model_provider

# The errors a tool reports as `tool: error: ...` with exit status 2 (user mistakes, not bugs).
USER_ERRORS = (CheckpointError, TokenizerError)

warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed")
warnings.filterwarnings("ignore", message="full scope is deprecated")


@dataclass
class TrainedModel:
    model: torch.nn.Module  # LcotGPTModel, eval mode, on parallel.device()
    args: argparse.Namespace  # the flags it was trained with
    tokenizer: LcotTokenizer | None  # None when its files are gone and none is needed
    iteration: int

    @property
    def vocab_size(self) -> int:
        """The real vocabulary (padded rows excluded)."""
        return self.tokenizer.vocab_size if self.tokenizer is not None else self.args.padded_vocab_size


def _tokenizer_of(args, tokenizer_model: str | None) -> LcotTokenizer:
    model_path = tokenizer_model or args.tokenizer_model
    try:
        return build_tokenizer(args.tokenizer_type, model_path, args.vocab_file, args.merge_file, args.vocab_size)
    except TokenizerError as error:
        raise TokenizerError(f"the checkpoint's tokenizer cannot be loaded ({error}); pass --tokenizer-model "
                             "with the file it was trained with") from None


def load_trained_model(root: str, iteration: int | None = None, tokenizer_model: str | None = None) -> TrainedModel:
    """Build the checkpoint's model on one process and load its weights (CheckpointError or
    TokenizerError, naming the path and the fix, on a bad directory)."""
    if not os.path.isdir(root):
        raise CheckpointError(f"--load {root!r}: no such directory; pass a directory written by "
                              "pretrain_lcot.py --save.")
    parallel.initialize()  # one process; the checkpoint's file is found through parallel_state
    args = argparse.Namespace(**saved_args(root, iteration))
    tokenizer = _tokenizer_of(args, tokenizer_model)
    args.tensor_model_parallel_size = args.pipeline_model_parallel_size = 1
    model = model_provider(args).to(parallel.device())
    loaded = load_model_weights(root, model, iteration)
    model.eval()
    return TrainedModel(model, args, tokenizer, loaded)
