"""`--torch-compile`: each decoder layer's forward compiled with torch.compile.

The layers are compiled in place (`nn.Module.compile`), so parameter names, checkpoints and the
DDP wrapping that follows are unchanged. Latent passes hand the layers inputs of a different
length every pass (the packed live tokens of a halting pass, T(K+1) slots interleaved), so the
layers are compiled with dynamic shapes: one graph serves every packed width instead of one
recompile per width. What still specialises a graph is Python state the layer reads (the pass's
stream index and whether it is packed, through the `LatentPass` the core attention receives),
bounded by the latent steps, not by the data. Graphs break around the KV store's writes (Python
dicts); the compiled regions are the projections, MLP and norms.
"""

from __future__ import annotations


def compile_decoder_layers(model) -> int:
    """Compile every transformer layer of `model`'s decoder (an LcotGPTModel stage) in place;
    returns how many were compiled."""
    layers = list(model.decoder.layers)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
