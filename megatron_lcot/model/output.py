"""LcotOutput: what LcotGPTModel.forward returns, in every mode and with or without labels.

One type for every caller (the training loss function, scoring, generation checks, tools), so
none has to guess from the labels or the mode what came back, and none reads latent steps
through a forward hook.

The one exception is a non-last pipeline stage: there the forward returns its hidden-state
tensor [s, b, h], because megatron-core's pipeline schedule sends that tensor to the next stage
as it is (parallel/pipeline_passes.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from megatron_lcot.model.halting import LatentThoughts


class LcotOutput(NamedTuple):
    """The model's output on the last pipeline stage (all tensors batch first).

    loss: [b, s] training loss = lm_loss + halting_loss_weight * correctness penalty (with
        labels; None without).
    lm_loss: [b, s] next-token cross-entropy of the model's output, the one perplexity uses
        (with labels; None without).
    latent_steps: [b, s] executed latent steps per token (None in vanilla mode).
    expected_latent_steps: [b, s] soft ponder cost, reach summed over executed steps (None in
        vanilla mode).
    logits: [b, s, vocab/tp] the LM head's output (without labels; None with them, since the
        vocab-parallel cross-entropy reuses the logits' memory).
    thoughts: the latent schedule's step states and reach (LatentThoughts), only when the
        forward is asked for them (`return_thoughts=True`) in a latent mode.
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    latent_steps: torch.Tensor | None = None
    expected_latent_steps: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    thoughts: LatentThoughts | None = None
