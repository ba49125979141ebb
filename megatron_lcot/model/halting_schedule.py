"""The halting recipe's schedule: what the adaptive loss and pruning use at each training iteration.

As an LR scheduler gives the optimizer its learning rate per iteration, `HaltingSchedule` gives
the model its halting settings per iteration: the training loop asks `schedule.at(i)` before
step i and hands the `HaltingSettings` to the model's forward (`halting=`); evaluation, tools
and decoding hand nothing and get `schedule.final()`, what decoding does. The settings depend
on the iteration alone, so a resumed run gets the same ones (docs/method.md):

* the halting warm-up (`--halting-warmup-iters` W): while i < W the correctness-aware penalty
  weight ramps linearly, lambda i / W, and nothing is pruned (every token runs every step, so
  each gate gets gradient from every token: a pruned token gives its gate none and could never
  come back), or, with `--halting-warmup-ramp-threshold`, tokens are pruned at tau i / W, so the
  warm-up's cost falls as the router learns to halt;
* the penalty sample (`--halting-penalty-fraction`): the share of executed tokens whose
  correctness penalty is computed in training, drawn from a generator seeded by the run's seed
  and the iteration (the same sample on every tensor-parallel rank, and again after a resume).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_lcot.model.config import LcotConfig


@dataclass(frozen=True)
class HaltingSettings:
    """One forward's halting settings: prune a token once its reach falls below `threshold`,
    weigh the penalty by `loss_weight`, compute it on `penalty_fraction` of the executed tokens
    drawn with a generator seeded by `penalty_seed`."""

    threshold: float
    loss_weight: float
    penalty_fraction: float
    penalty_seed: int

    def penalty_generator(self, device) -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed(self.penalty_seed)
        return generator


class HaltingSchedule:
    """The halting settings as a function of the training iteration, built from the config."""

    def __init__(self, config: LcotConfig):
        self.config = config

    def at(self, iteration: int) -> HaltingSettings:
        """Settings of training iteration `iteration` (0-based, the loop's own counter)."""
        config = self.config
        warmup = config.halting_warmup_iters
        ramp = iteration / warmup if iteration < warmup else 1.0
        if ramp < 1.0 and not config.halting_warmup_ramp_threshold:
            threshold = 0.0
        else:
            threshold = config.halting_threshold * ramp
        return HaltingSettings(
            threshold=threshold,
            loss_weight=config.halting_loss_weight * ramp,
            penalty_fraction=config.halting_penalty_fraction,
            penalty_seed=config.seed * 1_000_003 + iteration,
        )

    def final(self) -> HaltingSettings:
        """Evaluation, tools and decoding: the full threshold and weight, every token's penalty."""
        config = self.config
        return HaltingSettings(
            threshold=config.halting_threshold,
            loss_weight=config.halting_loss_weight,
            penalty_fraction=1.0,
            penalty_seed=config.seed * 1_000_003,
        )
