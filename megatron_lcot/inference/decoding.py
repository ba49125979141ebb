"""Incremental decoding of LcotGPTModel against a latent KV store, with per-token halting.

`LatentDecoder(model)(cache, input_ids, valid)` appends new tokens to the cache (a
`model.engine.LatentKVStore` that persists between calls) and returns their logits and executed
latent steps. It runs the model's own modules (embedding, the megatron-core TransformerBlock,
the halting router, the output layer) through the model's own latent schedule
(`schedule.decode`): the passes of training's one engine (model/engine.py), with the new tokens
appended to the store instead of filling an empty one, so it computes exactly what the training
forward computes (stepwise: pass k of all new tokens at once, the router's decision, KV reuse,
the exit-mass mixture; interleaved: the K+1 slots of each token in order, exact). Vanilla is
the stepwise schedule with K = 0.
"""

from __future__ import annotations

import torch

from megatron_lcot.model.engine import LatentKVStore, LatentRun
from megatron_lcot.model.latent import StepwiseSchedule


class LatentDecoder:
    """Decodes new tokens of a batch of sequences; see the module docstring."""

    def __init__(self, model) -> None:
        self.model = model
        self.config = model.config
        self.schedule = model.latent_schedule or StepwiseSchedule(model.config)

    @torch.no_grad()
    def __call__(self, cache: LatentKVStore, input_ids: torch.Tensor, valid: torch.Tensor | None = None):
        """input_ids, valid [b, n] -> (logits [b, n, padded vocab], latent steps [b, n])."""
        if valid is None:
            valid = torch.ones_like(input_ids, dtype=torch.bool)
        valid = valid.bool()
        positions = cache.next_positions(valid)  # [b, n]
        embeds = self.model.embed_tokens(input_ids, positions)
        run = LatentRun.start(
            embeds, self.model.rotary_pos_emb, positions.t(), input_ids.shape[0], cache, valid
        )
        thoughts = self.schedule.decode(run, self.model.decoder, self.model.halting_router)
        logits, _ = self.model.output_layer(thoughts.output_states())
        return logits.transpose(0, 1), thoughts.latent_steps().transpose(0, 1)
