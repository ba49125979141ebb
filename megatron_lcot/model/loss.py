"""Per-token losses and halting statistics of the latent-thought model (docs/method.md).

Everything here is per token ([b, s], batch first like GPTModel's loss); masking by the
dataset's loss_mask and averaging happen in the training loop's loss function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_lcot.model.halting import LatentThoughts


def correctness_penalty(
    thoughts: LatentThoughts,
    token_loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    exponent: float,
) -> torch.Tensor:
    """[b, s] sum over executed steps k < K of r(t,k+1) * sg(p(t,k))^beta.

    p(t,k) = exp(-CE) is the probability step k's own output assigns to the gold next token
    (`token_loss_of(step_state [n,b,h], labels [b,n]) -> CE [b,n]`, vocab-parallel), under
    stop-gradient: continuing past a step that already predicts the gold token is penalised,
    and only the reach (hence the router) receives the gradient. The LM head runs only on the
    tokens that executed step k (packed, as the pass itself ran them): a halted token's term is 0.
    """
    num_gates = thoughts.reach.shape[0] - 1
    penalty = 0.0
    for step in range(num_gates):
        executed = thoughts.executed[step]  # [s, b]
        live = thoughts.packing(step)
        with torch.no_grad():
            if live is None:  # every token executed step `step`
                gold_prob = torch.exp(-token_loss_of(thoughts.step_states[step], labels)) ** exponent
            else:  # the head on the live tokens only, packed as the pass ran them
                packed_labels = live.gather(labels.t()[..., None])[..., 0].t()  # [1, N]
                packed_ce = token_loss_of(live.gather(thoughts.step_states[step]), packed_labels)
                gold_prob = live.scatter(
                    (torch.exp(-packed_ce) ** exponent).t(), torch.zeros_like(executed, dtype=packed_ce.dtype)
                )
                gold_prob = gold_prob.t()
        continue_reach = (thoughts.reach[step + 1] * executed).transpose(0, 1)
        penalty = penalty + continue_reach * gold_prob
    return penalty
