"""A trained checkpoint as a one-process model in eval mode, with its RunConfig and tokenizer.

The seam every inference tool uses (export, generation, evaluation): the configuration comes
from `checkpointing.load_run_config`, the model from `model/building.py`, the weights from
`checkpointing.load_model_weights`. The model is built on one process (tensor and pipeline
size 1) whatever layout the checkpoint was trained with.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from megatron_lcot import parallel
from megatron_lcot.checkpoint.checkpointing import CheckpointError, load_model_weights, load_run_config
from megatron_lcot.data.tokenizers import LcotTokenizer, TokenizerError, build_tokenizer
from megatron_lcot.model.building import build_model
from megatron_lcot.run_config import RunConfig

# The errors a tool reports as `tool: error: ...` with exit status 2 (user mistakes, not bugs).
USER_ERRORS = (CheckpointError, TokenizerError)

warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed")
warnings.filterwarnings("ignore", message="full scope is deprecated")


@dataclass
class TrainedModel:
    model: torch.nn.Module  # LcotGPTModel, eval mode, on parallel.device()
    config: RunConfig  # the run that trained it, at TP = PP = 1
    tokenizer: LcotTokenizer | None  # None when its files are gone and none is needed
    iteration: int

    @property
    def vocab_size(self) -> int:
        """The real vocabulary (padded rows excluded)."""
        if self.tokenizer is None:
            return self.config.model.padded_vocab_size
        return self.tokenizer.vocab_size


def _tokenizer_of(data, tokenizer_model: str | None) -> LcotTokenizer:
    """data: the RunConfig's data section."""
    model_path = tokenizer_model or data.tokenizer_model
    try:
        return build_tokenizer(
            data.tokenizer_type, model_path, data.vocab_file, data.merge_file, data.vocab_size
        )
    except TokenizerError as error:
        raise TokenizerError(
            f"the checkpoint's tokenizer cannot be loaded ({error}); pass --tokenizer-model "
            "with the file it was trained with"
        ) from None


def load_trained_model(
    root: str, iteration: int | None = None, tokenizer_model: str | None = None
) -> TrainedModel:
    """Build the checkpoint's model on one process and load its weights (CheckpointError or
    TokenizerError, naming the path and the fix, on a bad directory)."""
    if not os.path.isdir(root):
        raise CheckpointError(
            f"--load {root!r}: no such directory; pass a directory written by pretrain_lcot.py --save."
        )
    parallel.initialize()  # one process; the checkpoint's file is found through parallel_state
    config = load_run_config(root, iteration).for_one_process()
    tokenizer = _tokenizer_of(config.data, tokenizer_model)
    model = build_model(config.model).to(parallel.device())
    loaded = load_model_weights(root, model, iteration)
    model.eval()
    return TrainedModel(model, config, tokenizer, loaded)
