"""FLOPs accounting (megatron_lcot/model/flops.py) against hand counts, the masks' own key
counts, and torch's FlopCounterMode on the real model.

On CPU FlopCounterMode counts `aten.mm` only: it sees every linear layer and the LM head, but
not SDPA (the CPU flash kernel is not in its registry) and not the router's matrix-vector
product. So the model comparison checks our count minus the attention term (whose key counts
are checked against the dense masks separately).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_lcot.model import flops
from megatron_lcot.model.config import llama_config
from megatron_lcot.model.masking import interleaved_dense_mask, stepwise_dense_mask
from tests.reference.helpers import init_megatron, real_token_batch, single_thread_fixture

_single_thread = single_thread_fixture()


def hand_config(**fields):
    """1 layer, h 4, 2 heads of 2 channels, 1 KV group, SwiGLU 8: small enough to count by hand."""
    return llama_config(
        num_layers=1, hidden_size=4, num_attention_heads=2, num_query_groups=1, ffn_hidden_size=8, **fields
    )


# Per slot: QKV 2*4*(4+4) = 64, proj 2*4*4 = 32, SwiGLU 2*(4*16 + 8*4) = 192 -> 288.
# Attention 4 * 4 * keys; head 2 * 4 * 10 = 80. T = 3 tokens: causal keys per token (3+1)/2 = 2.
V, T = 10, 3


def test_hand_count_vanilla():
    forward = 288 + 4 * 4 * 2 + 80
    assert flops.inference_flops_per_token(hand_config(), T, V) == forward
    assert flops.training_flops_per_token(hand_config(), T, V) == 3 * forward


def test_hand_count_stepwise_fixed_and_adaptive():
    step0, step1 = 288 + 4 * 4 * 2, 288 + 4 * 4 * 4  # step 1 sees steps 0 and 1: 2 x 2 keys
    fixed = hand_config(latent_steps=1)
    assert flops.training_flops_per_token(fixed, T, V) == 3 * (step0 + step1 + 80)
    adaptive = hand_config(latent_steps=1, halting="adaptive")
    # half the tokens run step 1; one router gate (2 h) per token after step 0; the penalty's
    # forward-only head on step 0 (80, not tripled).
    graph = step0 + 0.5 * step1 + 80 + 8
    assert flops.inference_flops_per_token(adaptive, T, V, step_shares=[1, 0.5]) == graph
    assert flops.training_flops_per_token(adaptive, T, V, step_shares=[1, 0.5]) == 3 * graph + 80


def test_hand_count_interleaved():
    config = hand_config(latent_steps=1, latent_layout="interleaved", jacobi_iters=(2, 4))
    warm_up = 288 + 4 * 4 * 2  # one slot per token, causal
    full = 2 * 288 + 4 * 4 * 7  # 6 slots causal: 21 keys over 3 tokens
    assert flops.training_flops_per_token(config, T, V) == 3 * (warm_up + (3 + 1) * full + 80)  # J = mean 3
    assert flops.training_flops_per_token(config, T, V, jacobi_iters=2) == 3 * (warm_up + 3 * full + 80)
    assert flops.inference_flops_per_token(config, T, V) == full + 80


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_key_counts_match_dense_masks(steps):
    """Keys per token in the formulas = allowed entries of the dense reference masks / T."""
    config = hand_config(latent_steps=steps)
    seq = 7
    per_key = flops.attention_flops(config, 1)
    stepwise_keys = sum(flops.stepwise_step_flops(config, seq, k) - 288 for k in range(steps + 1)) / per_key
    assert stepwise_keys == stepwise_dense_mask(seq, steps).sum().item() / seq
    interleaved_keys = (flops.causal_pass_flops(config, seq, steps + 1) - (steps + 1) * 288) / per_key
    assert interleaved_keys == interleaved_dense_mask(seq, steps).sum().item() / seq


def test_step_shares_from_halted_and_validation():
    assert flops.step_shares_from_halted([0.25, 0.25, 0.5]) == [1.0, 0.75, 0.5]
    with pytest.raises(ValueError, match="latent_steps \\+ 1 = 3"):
        flops.training_flops_per_token(hand_config(latent_steps=2), T, V, step_shares=[1.0, 0.5])


MODES = {
    "vanilla": dict(latent_steps=0),
    "stepwise_k2": dict(latent_steps=2),
    "adaptive_k2": dict(latent_steps=2, halting="adaptive"),
    # the penalty's head on a quarter of the executed tokens (32 per step here: exactly 8)
    "adaptive_k2_penalty_quarter": dict(latent_steps=2, halting="adaptive", halting_penalty_fraction=0.25),
    # the entropy router's forward-only head on every gated step
    "adaptive_k2_entropy_router": dict(latent_steps=2, halting="adaptive", halting_router="entropy"),
    "interleaved_k1_j2": dict(latent_steps=1, latent_layout="interleaved", jacobi_iters=(2,)),
}


def _attention_only(config, seq: int) -> float:
    """Training attention FLOPs per token, counted independently of flops.py from the masks."""
    d = config.num_attention_heads * config.kv_channels
    if config.latent_layout == "interleaved" and config.latent_steps:
        passes = [k for k in range(1, config.latent_steps + 1)]  # warm-up slots per token
        passes += [config.latent_steps + 1] * (config.jacobi_iters[0] + 1)
        keys = sum(interleaved_dense_mask(seq, n - 1).sum().item() for n in passes) / seq
    else:
        keys = stepwise_dense_mask(seq, config.latent_steps).sum().item() / seq
    return 3 * config.num_layers * 4 * d * keys


def _router_only(config) -> float:
    return 3 * 2 * config.hidden_size * config.latent_steps if config.adaptive else 0.0


@pytest.mark.parametrize("mode", sorted(MODES))
def test_training_count_matches_flop_counter_on_the_model(mode):
    """fwd + bwd of the real model under FlopCounterMode (aten.mm) vs our count without the
    ops it cannot see: equal."""
    from megatron_lcot.model import build_lcot_model
    from megatron_lcot.model.halting_schedule import HaltingSchedule

    vocab, seq, batch = 320, 16, 2
    config = llama_config(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        num_query_groups=2,
        **MODES[mode],
    )
    init_megatron(7)
    model = build_lcot_model(config, vocab_size=vocab, max_sequence_length=64).train()
    ids, labels = real_token_batch(batch, seq, vocab)
    counter = FlopCounterMode(display=False)
    with counter:
        halting = HaltingSchedule(config).at(0)  # a training step's settings, as the loop hands them
        output = model(ids, torch.arange(seq).expand(batch, seq), labels=labels, halting=halting)
        output.loss.sum().backward()
        if config.adaptive:  # every token ran every step (fresh router: continue prob 0.9)
            assert output.latent_steps.min().item() == config.latent_steps
    counted = counter.get_total_flops() / (batch * seq)
    assert set(map(str, counter.get_flop_counts()["Global"])) == {"aten.mm"}
    ours = flops.training_flops_per_token(config, seq, vocab)
    ours_matmuls = ours - _attention_only(config, seq) - _router_only(config)
    assert abs(ours_matmuls - counted) <= 1e-9 * counted, (ours_matmuls, counted)
