"""Halting: routers that decide, per token and latent step, whether to keep thinking.

A router is a spec'd submodule (`LcotSubmodules.halting_router`) with one method:
`router(step_state [s, b, h], step k) -> continue_prob [s, b]`, the probability g(t, k) that
token t runs step k+1 given the final-normed output of its step k. Swapping the spec swaps the
rule; the schedule (latent.py) turns gates into reach, executed steps and exit mass with the
functions below, which are shared by every router (METHOD.md section 3).
"""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_lcot.model.config import LcotConfig


class LinearHaltingRouter(MegatronModule):
    """One linear gate per latent step: g(t,k) = sigmoid(w_k . y(t,k) + b_k).

    weight [K, h] starts at zero and bias [K] at logit(halting_init_continue_prob), so at
    initialisation every token continues with the same probability (0.9 by default: most tokens
    think) and the router learns from the exit-mass mixture which tokens may stop. The router is
    tiny and reads the full hidden state, so it is replicated on every tensor-parallel rank.
    """

    def __init__(self, config: LcotConfig):
        super().__init__(config=config)
        p = config.halting_init_continue_prob
        self.weight = torch.nn.Parameter(
            torch.zeros(config.latent_steps, config.hidden_size, dtype=config.params_dtype)
        )
        self.bias = torch.nn.Parameter(
            torch.full((config.latent_steps,), math.log(p / (1 - p)), dtype=config.params_dtype)
        )

    def forward(self, step_state: torch.Tensor, step: int) -> torch.Tensor:
        return torch.sigmoid(step_state @ self.weight[step] + self.bias[step])


class NoHalting(MegatronModule):
    """Fixed-K latent thoughts: every token always continues (g = 1)."""

    def __init__(self, config: LcotConfig):
        super().__init__(config=config)

    def forward(self, step_state: torch.Tensor, step: int) -> torch.Tensor:
        return step_state.new_ones(step_state.shape[:-1])


def exit_mass(reach: torch.Tensor, executed: torch.Tensor) -> torch.Tensor:
    """Share of each token's output taken from each executed step, pruned mass moved back.

    reach:    [n, s, b] r(t,k) for the n computed steps (r(t,0) = 1, non-increasing in k).
    executed: [n, s, b] bool, step k of token t was executed (monotone in k).
    Returns [n, s, b]: e(t,k) = r(t,k) - r(t,k+1) while step k+1 runs; at a token's last
    executed step, the whole remaining reach r(t,k) (its own exit mass plus that of every
    pruned later step); 0 for steps not executed. Sums to 1 over k.
    """
    runs_next = torch.cat([executed[1:], torch.zeros_like(executed[:1])])
    next_reach = torch.cat([reach[1:], torch.zeros_like(reach[:1])])
    last = torch.where(executed, reach, torch.zeros_like(reach))
    return torch.where(runs_next, reach - next_reach, last)
