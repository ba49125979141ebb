"""Build one pipeline stage of the model that a RunConfig's model section describes.

The one builder behind training (`training/providers.py`), resharding, inference loading and
the Hugging Face import: they all hand it the model section and a layout.
"""

from __future__ import annotations

from megatron_lcot import parallel
from megatron_lcot.model import LcotGPTModel, build_lcot_model


def build_model(
    model,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    pre_process: bool = True,
    post_process: bool = True,
) -> LcotGPTModel:
    """model: a `run_config.ModelSection` with `padded_vocab_size` set. bf16/fp16 weights
    follow the section (the optimizer keeps fp32 main copies); parallel_state must be
    initialised at the given layout."""
    if model.padded_vocab_size is None:
        raise ValueError(
            "the model section has no padded_vocab_size; build it after the tokenizer "
            "(arguments.set_padded_vocab_size)"
        )
    config = model.lcot_config(
        tensor_model_parallel_size, pipeline_model_parallel_size, batch_p2p_comm=parallel.backend() != "gloo"
    )
    return build_lcot_model(
        config,
        vocab_size=model.padded_vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        use_te=model.transformer_impl == "transformer_engine",
    )
