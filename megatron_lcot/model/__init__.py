"""The latent-thought LM as megatron-core specs (see layer_specs.py for the spec tree)."""

from megatron.core.transformer.spec_utils import build_module

from megatron_lcot.model.config import LcotConfig, llama_config
from megatron_lcot.model.layer_specs import LcotSubmodules, get_lcot_layer_spec, get_lcot_model_spec
from megatron_lcot.model.lcot_model import LcotGPTModel
from megatron_lcot.model.output import LcotOutput


def build_lcot_model(
    config: LcotConfig,
    vocab_size: int,
    max_sequence_length: int,
    pre_process: bool = True,
    post_process: bool = True,
    use_te: bool | None = None,
    parallel_output: bool = True,
) -> LcotGPTModel:
    """Build the model for `config` from its spec (parallel_state must be initialised)."""
    return build_module(
        get_lcot_model_spec(config, use_te),
        config=config,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
    )


__all__ = [
    "LcotConfig",
    "LcotGPTModel",
    "LcotOutput",
    "LcotSubmodules",
    "build_lcot_model",
    "get_lcot_layer_spec",
    "get_lcot_model_spec",
    "llama_config",
]
