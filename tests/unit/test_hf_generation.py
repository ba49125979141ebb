"""Incremental decoding with the latent KV cache (fp32, CPU), on checkpoints trained a few steps.

At every decoding step the cached logits must equal a full recomputation of the sequence by the
training forward (interleaved: Jacobi run to its exact fixed point, T(K+1) iterations). Adaptive
halting runs on `halting_checkpoint` (a decisive router: tokens halt at different steps,
including before the first latent step); batched left-padded generation must equal one prompt
at a time.
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.hf_fixtures import MODES

PROMPTS = ["The Congress of the United States", "War", "In the year that has passed since my last message"]


@pytest.fixture(scope="module")
def checkpoints(trained_checkpoints, halting_checkpoint) -> dict:
    """The four modes, adaptive with the decisive router (tokens stop after 0, 1, 2 or 3 steps)."""
    return {**trained_checkpoints, "adaptive": halting_checkpoint}


def _loaded(checkpoints, mode):
    from megatron_lcot.inference.loading import load_trained_model

    torch.set_num_threads(1)
    return load_trained_model(checkpoints[mode])


def _full_logits(trained, ids):
    kwargs = {}
    if trained.config.model.latent_layout == "interleaved" and trained.config.model.latent_steps > 0:
        kwargs["jacobi_iters"] = len(ids) * (trained.config.model.latent_steps + 1)  # the exact fixed point
    with torch.no_grad():
        return trained.model(torch.tensor([ids]), torch.arange(len(ids))[None], **kwargs).logits[
            0, -1, : trained.vocab_size
        ]


@pytest.mark.parametrize("mode", list(MODES))
def test_cached_decoding_equals_full_recomputation(checkpoints, mode):
    from megatron_lcot.inference.generation import generate_ids
    from megatron_lcot.inference.sampling import SamplingParams

    trained = _loaded(checkpoints, mode)
    prompt = trained.tokenizer.tokenize(PROMPTS[0])
    result = generate_ids(
        trained, [prompt], 16, SamplingParams(greedy=True), keep_logits=True, stop_at_eod=False
    )
    tokens, logits = result.tokens[0], result.step_logits[0]
    worst = 0.0
    for step in range(len(tokens)):
        reference = _full_logits(trained, prompt + tokens[:step])
        worst = max(worst, (logits[step] - reference).abs().max().item())
        assert int(reference.argmax()) == tokens[step]
    print(f"{mode}: max |cached - full| over {len(tokens)} steps = {worst:.3g}")
    assert worst < 1e-4
    steps = result.latent_steps[0]
    if mode == "adaptive":  # halting happened, at several different steps, some before the first thought
        assert min(steps) == 0 and len(set(steps)) >= 2 and max(steps) <= 3
    else:
        assert set(steps) == {float(trained.config.model.latent_steps)}


@pytest.mark.parametrize("mode", ["adaptive", "interleaved"])
def test_batched_left_padding_equals_one_at_a_time(checkpoints, mode):
    from megatron_lcot.inference.generation import generate
    from megatron_lcot.inference.sampling import SamplingParams

    trained = _loaded(checkpoints, mode)
    greedy = SamplingParams(greedy=True)
    batched = generate(trained, PROMPTS, 10, greedy)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(trained, [prompt], 10, greedy)
        assert batched.tokens[row] == alone.tokens[0]
        assert batched.latent_steps[row] == alone.latent_steps[0]


def test_sampling_is_seeded_and_respects_top_k(checkpoints):
    from megatron_lcot.inference.generation import generate
    from megatron_lcot.inference.sampling import SamplingParams

    trained = _loaded(checkpoints, "stepwise")
    params = SamplingParams(temperature=1.5, top_k=3, seed=7)
    first = generate(trained, PROMPTS[:1], 12, params, keep_logits=True)
    again = generate(trained, PROMPTS[:1], 12, params)
    assert first.tokens == again.tokens
    for token, logits in zip(first.tokens[0], first.step_logits[0]):
        assert token in logits.topk(3).indices.tolist()
    with pytest.raises(ValueError, match="--top-p"):
        SamplingParams(top_p=0.0)
