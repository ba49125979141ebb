"""Per-token losses and halting statistics of the latent-thought model (docs/method.md).

Everything here is per token ([b, s], batch first like GPTModel's loss); masking by the
dataset's loss_mask and averaging happen in the training loop's loss function.
"""

from __future__ import annotations

import math

import torch

from megatron_lcot.model.halting import LatentThoughts


def penalty_samples(thoughts: LatentThoughts, fraction: float, generator: torch.Generator) -> list:
    """For each gated step k < K: (rows [m], scale), the tokens whose penalty term is computed.

    rows index the flattened [s * b] tokens (row = t * b + sequence, LivePacking's order) that
    executed step k; with fraction < 1 they are a uniform sample without replacement of
    m = ceil(fraction n) of the n executed tokens and scale = n / m, so the scaled sum over the
    sample has the full sum's expectation. fraction 1 keeps every executed token (scale 1).
    """
    samples = []
    for step in range(thoughts.reach.shape[0] - 1):
        live = thoughts.packing(step)
        executed = thoughts.executed[step]
        rows = torch.arange(executed.numel(), device=executed.device) if live is None else live.rows
        if fraction < 1.0:
            count = rows.numel()
            kept = max(1, math.ceil(fraction * count))
            rows = rows[torch.randperm(count, generator=generator, device=rows.device)[:kept]]
            samples.append((rows, count / kept))
        else:
            samples.append((rows, 1.0))
    return samples


def correctness_penalty(thoughts: LatentThoughts, samples: list, gold_probs: list) -> torch.Tensor:
    """[b, s] sum over gated steps k of r(t,k+1) * sg(p(t,k))^beta over the sampled tokens.

    p(t,k) is the probability step k's own output assigns to the gold next token; gold_probs[k]
    [m] holds sg(p)^beta for samples[k]'s rows (the model's head computes it under
    stop-gradient): continuing past a step that already predicts the gold token is penalised,
    and only the reach (hence the router) receives the gradient. A token that did not execute
    step k (or was not sampled) has no term there.
    """
    num_tokens, batch = thoughts.executed.shape[1:]
    penalty = torch.zeros(num_tokens * batch, dtype=torch.float32, device=thoughts.reach.device)
    for step, ((rows, scale), gold_prob) in enumerate(zip(samples, gold_probs)):
        continue_reach = thoughts.reach[step + 1].flatten()[rows]
        penalty = penalty.index_add(0, rows, continue_reach * gold_prob * scale)
    return penalty.view(num_tokens, batch).t()
