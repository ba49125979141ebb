"""Halting: routers that decide, per token and latent step, whether to keep thinking.

A router is a spec'd submodule (`LcotSubmodules.halting_router`), a `HaltingRouter` with one
method: `router(step_state [s, b, h], step k) -> continue_prob [s, b]` (fp32), the probability
g(t, k) that token t runs step k+1 given the final-normed output of its step k; the base class
adds the training recipe's warm-up (`threshold()`, `loss_weight()`). Swapping the spec swaps the
rule; the schedule (latent.py) turns gates into reach, executed steps and exit mass with the
functions below, which are shared by every router (docs/method.md).
"""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_lcot.model.config import LcotConfig


class HaltingRouter(MegatronModule):
    """Base of every router: what the halting recipe needs beside the gates.

    `training_iteration` is set by the training loop before each step
    (`set_training_iteration`); it drives the halting warm-up (`--halting-warmup-iters` W):
    while a training step's iteration i is below W nothing is pruned (every token runs every
    step, so each gate gets gradient from every token: a pruned token gives its gate none and
    could never come back) and the correctness-aware penalty weight ramps linearly, lambda i / W.
    Evaluation and inference always prune at `halting_threshold` (what decoding does).
    """

    def __init__(self, config: LcotConfig):
        super().__init__(config=config)
        self.training_iteration = None  # None: not under the training loop (tools, tests)

    def in_warmup(self) -> bool:
        return (self.training and self.training_iteration is not None
                and self.training_iteration < self.config.halting_warmup_iters)

    def threshold(self) -> float:
        """tau for this forward: 0 (no pruning) during the warm-up."""
        return 0.0 if self.in_warmup() else self.config.halting_threshold

    def loss_weight(self) -> float:
        """lambda for this forward: lambda i / W during the warm-up."""
        if self.in_warmup():
            return self.config.halting_loss_weight * self.training_iteration / self.config.halting_warmup_iters
        return self.config.halting_loss_weight


class LinearHaltingRouter(HaltingRouter):
    """One linear gate per latent step: g(t,k) = sigmoid(w_k . y(t,k) + b_k).

    weight [K, h] starts at zero and bias [K] at logit(halting_init_continue_prob), so at
    initialisation every token continues with the same probability (0.9 by default: most tokens
    think) and the router learns from the exit-mass mixture which tokens may stop. The router is
    tiny and reads the full hidden state, so it is replicated on every tensor-parallel rank.
    Its weights are created fp32 whatever `params_dtype` is, and its arithmetic is fp32 even if
    a wrapper casts the module (DeepSpeed bf16): in bf16 a gate logit near 2.2 has a resolution
    of 2^-6, and hard pruning decisions (reach >= tau) would flip on rounding. Returns fp32 gates.
    """

    def __init__(self, config: LcotConfig):
        super().__init__(config=config)
        p = config.halting_init_continue_prob
        self.weight = torch.nn.Parameter(torch.zeros(config.latent_steps, config.hidden_size, dtype=torch.float32))
        self.bias = torch.nn.Parameter(torch.full((config.latent_steps,), math.log(p / (1 - p)), dtype=torch.float32))

    def forward(self, step_state: torch.Tensor, step: int) -> torch.Tensor:
        return torch.sigmoid(step_state.float() @ self.weight[step].float() + self.bias[step].float())


class NoHalting(HaltingRouter):
    """Fixed-K latent thoughts: every token always continues (g = 1)."""

    def forward(self, step_state: torch.Tensor, step: int) -> torch.Tensor:
        return step_state.new_ones(step_state.shape[:-1], dtype=torch.float32)


def set_training_iteration(model: torch.nn.Module, iteration: int) -> None:
    """The training loop's one call per step: tell every router which iteration runs next
    (0-based), so the halting warm-up follows the loop's own counter (and a resumed run)."""
    for module in model.modules():
        if isinstance(module, HaltingRouter):
            module.training_iteration = iteration


def is_router_param(name: str, param: torch.nn.Parameter) -> bool:
    """Whether a named parameter belongs to a halting router (its own optimizer group: learning
    rate x `--halting-router-lr-mult`, no weight decay). Works through wrapper prefixes
    (`module.`)."""
    return "halting_router" in name.split(".")


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
