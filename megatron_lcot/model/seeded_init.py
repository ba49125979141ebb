"""Initialisation that does not depend on the tensor/pipeline layout.

megatron-core's `--use-cpu-initialization` draws each full weight on the CPU and then keeps this
rank's shard, so tensor-parallel ranks agree with one process. Pipeline stages do not: each
stage builds only its own layers from the one CPU stream, so stage 1's first layer draws what
layer 1 draws in one process. Here every decoder layer reseeds the CPU stream from
(`config.seed`, its global layer number) before megatron-core builds its weights, so a layer's
initial weights depend only on the seed and which layer it is:

* the embedding is drawn first, from `torch.manual_seed(config.seed)` (`seed_model_init`);
* layer n (1-based, global) from the stream `layer_init_seed(seed, n)`;
* the output layer after the last layer, i.e. from the continuation of layer L's stream, which
  is the same in every layout because the last stage always ends with layer L.

Only with `config.use_cpu_initialization`: without it megatron-core initialises on the device
from the model-parallel RNG tracker, which is per tensor-parallel rank by design.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset

# Distinct streams per layer without colliding with nearby --seed values.
_LAYER_STREAM_STRIDE = 1_000_003


def layer_init_seed(seed: int, global_layer_number: int) -> int:
    """The CPU seed of layer `global_layer_number`'s initial weights (1-based)."""
    return seed + _LAYER_STREAM_STRIDE * global_layer_number


def seed_model_init(config) -> None:
    """Start the embedding's stream (call before building a model from `config`)."""
    if config.use_cpu_initialization:
        torch.manual_seed(config.seed)


class SeededTransformerLayer(TransformerLayer):
    """megatron-core's TransformerLayer whose CPU-initialised weights come from its own stream.

    Same arguments and forward as TransformerLayer; `layer_number` is local to the pipeline
    stage, as megatron-core passes it, and the global number adds the stage's offset. Every
    other argument goes to TransformerLayer as given (those of a newer megatron-core too);
    `pg_collection` and `vp_stage` (keywords, as megatron-core's builders pass them) are read.
    """

    def __init__(self, config, submodules, layer_number: int = 1, *args, **kwargs):
        if config.use_cpu_initialization:
            pg_collection = kwargs.get("pg_collection")
            pp_rank = (
                pg_collection.pp.rank()
                if pg_collection is not None
                else parallel_state.get_pipeline_model_parallel_rank()
            )
            offset = get_transformer_layer_offset(config, kwargs.get("vp_stage"), pp_rank)
            torch.manual_seed(layer_init_seed(config.seed, layer_number + offset))
        super().__init__(config, submodules, layer_number, *args, **kwargs)
