"""Training FLOPs in the logs: FLOPs per token of each logging interval and the cumulative
`train_flops` of the run (model/flops.py counts them; this keeps the running total).

With adaptive halting the per-token cost depends on how many tokens ran each latent step, so
each interval is counted from its own halting shares (the share of tokens that executed step
k, from the logged `halted_share`); fixed modes cost the same every step. The interleaved
layout counts the mean of `--jacobi-iters`.
"""

from __future__ import annotations

from megatron_lcot.model.flops import step_shares_from_halted, training_flops_per_token


class TrainingFlops:
    """Counts each logging interval's FLOPs into `TrainState.train_flops`, which checkpoints
    save with the rest of the training state, so a resumed run continues the total."""

    def __init__(self, config, seq_length: int, vocab_size: int) -> None:
        self.config, self.seq_length, self.vocab_size = config, seq_length, vocab_size

    def add_interval(self, state, summary: dict, tokens: int) -> dict:
        """Count `tokens` training tokens at the interval's halting shares into `state`;
        returns `summary` with `flops_per_token` and the cumulative `train_flops` added."""
        shares = step_shares_from_halted(summary["halted_share"]) if self.config.adaptive else None
        per_token = training_flops_per_token(self.config, self.seq_length, self.vocab_size, shares)
        state.train_flops += per_token * tokens
        return {**summary, "flops_per_token": per_token, "train_flops": state.train_flops}
