"""CheckpointScorer reads the latent steps of each window without leaving a forward hook on the
model (one used to stay registered per scorer, and every later forward ran all of them)."""

from __future__ import annotations

import torch

from tests.unit.test_run_config import FLAGS_ONLY_CHECKPOINT


def test_scorers_leave_no_hook_and_report_the_steps():
    from megatron_lcot import parallel
    from megatron_lcot.inference.loading import load_trained_model
    from megatron_lcot.inference.scoring import CheckpointScorer

    trained = load_trained_model(FLAGS_ONLY_CHECKPOINT)
    try:
        schedule = trained.model.latent_schedule
        window = (torch.arange(16) % 60)[None]
        results = [CheckpointScorer(trained)(window) for _ in range(3)]
        assert len(schedule._forward_hooks) == 0
        logprobs, steps = results[0]
        assert logprobs.shape == (16, trained.vocab_size) and steps.shape == (16,)
        assert set(steps.tolist()) <= {0.0, 1.0} and steps.sum() > 0  # adaptive K=1: 0 or 1 step per token
        assert all(torch.equal(steps, other[1]) and torch.equal(logprobs, other[0]) for other in results[1:])
    finally:
        parallel.destroy()
