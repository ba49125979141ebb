"""Validation of the naive references themselves (tests/reference/naive_lm.py).

Before a reference may judge the model, it is checked against something it does not share
code with: megatron-core's own GPTModel (vanilla), and its own alternative formulations
(Jacobi fixed point vs. exact sequential decoding; adaptive halting in its limits).
All in fp32 on real token ids (byte-level State of the Union text, see tests/reference/helpers.py).
"""

from __future__ import annotations

import pytest
import torch

from tests.reference import naive_lm as ref
from tests.reference.helpers import (
    build_gpt_model,
    init_megatron,
    max_abs,
    randomize_norm_weights,
    real_token_batch,
    single_thread_fixture,
)

_single_thread = single_thread_fixture()

VOCAB, T, B = 320, 12, 2
SEED = 1234


def small_config(**fields):
    from megatron_lcot.model.config import llama_config

    return llama_config(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, num_query_groups=2, **fields
    )


@pytest.fixture(scope="module")
def gpt():
    """megatron-core GPTModel (local spec, RMSNorm, RoPE, GQA 4 heads / 2 groups, untied), fp32,
    with non-trivial norm weights."""
    init_megatron(SEED)
    model = build_gpt_model(small_config(), VOCAB, 64)
    randomize_norm_weights(model, SEED)
    model.eval()
    return model


@pytest.fixture(scope="module")
def batch():
    return real_token_batch(B, T, VOCAB)


def test_reference_vanilla_matches_megatron_gptmodel(gpt, batch):
    """Proves the reference's building blocks (embedding, RMSNorm with eps, per-group fused QKV
    split, rotate-half RoPE at explicit positions, GQA head->group mapping, softmax scale,
    linear_proj, SwiGLU [gate; up], final norm, untied head) are megatron-core's: the naive
    token-by-token KV-cache decoder gives GPTModel's logits (atol 1e-5) and per-token loss."""
    ids, labels = batch
    pos = torch.arange(T).expand(B, T)
    with torch.no_grad():
        want_logits = gpt(ids, pos, attention_mask=None)
        want_loss = gpt(ids, pos, attention_mask=None, labels=labels)
        w = ref.NaiveWeights.from_model(gpt)
        got_logits = ref.vanilla_logits(w, ids)
        got_loss = ref.per_token_ce(got_logits, labels)
    assert want_logits.shape == got_logits.shape == (B, T, VOCAB)
    assert want_loss.shape == (B, T)
    assert max_abs(want_logits, got_logits) < 1e-5
    assert max_abs(want_loss, got_loss) < 1e-5
    # the test can fail: a wrong position, or an unscaled embedding, is far away
    w_bad = ref.NaiveWeights.from_model(gpt)
    assert max_abs(ref.vanilla_logits(w_bad, ids, embedding_scale=2.0), want_logits) > 1e-2


def test_reference_rope_matches_megatron_rope():
    """Proves ref.rope == megatron-core's RotaryEmbedding + apply_rotary_pos_emb at every position."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    hd = 16
    rot = RotaryEmbedding(kv_channels=hd, rotary_percent=1.0, use_cpu_initialization=True)
    freqs = rot(20)  # [20, 1, 1, hd]
    x = torch.randn(20, 1, 3, hd, generator=torch.Generator().manual_seed(0))
    want = _apply_rotary_pos_emb_bshd(x, freqs)
    got = torch.stack([ref.rope(x[p, 0], p, 10000.0) for p in range(20)])[:, None]
    assert max_abs(want, got) < 1e-5


def test_reference_stepwise_k0_is_vanilla(gpt, batch):
    """Proves the stepwise reference reduces to the vanilla one at K = 0 (same scale)."""
    ids, _ = batch
    w = ref.NaiveWeights.from_model(gpt)
    with torch.no_grad():
        assert max_abs(ref.stepwise_logits(w, ids, 0, 3.0), ref.vanilla_logits(w, ids, 3.0)) < 1e-6


def test_reference_jacobi_converges_to_sequential(gpt, batch):
    """Proves the two independent interleaved references agree: the plain Jacobi loop over the
    full slot sequence (dense causal mask, whole-sequence matmuls) reaches the exact sequential
    slot-by-slot decoding after J = T(K+1) iterations (its fixed point), while small J does not
    (so the comparison is not vacuous)."""
    ids, _ = batch
    K, scale = 2, 5.0
    w = ref.NaiveWeights.from_model(gpt)
    with torch.no_grad():
        seq = ref.interleaved_sequential_logits(w, ids, K, scale)
        full = ref.interleaved_jacobi_logits(w, ids, K, ids.shape[1] * (K + 1), scale)
        j0 = ref.interleaved_jacobi_logits(w, ids, K, 0, scale)
    assert max_abs(seq, full) < 1e-4
    assert max_abs(seq, j0) > 1e-3


def _with_router(gpt, K, weight_scale, bias):
    w = ref.NaiveWeights.from_model(gpt)
    gen = torch.Generator().manual_seed(7)
    w.router_weight = weight_scale * torch.randn(K, w.final_norm.shape[0], generator=gen)
    w.router_bias = torch.full((K,), float(bias))
    return w


def test_reference_adaptive_limits(gpt, batch):
    """Proves the adaptive reference's limits: a router that always continues (g = 1) gives the
    stepwise fixed-K logits with K executed steps everywhere; a router that always stops gives the
    vanilla (step-0) logits with 0 latent steps; pruned slots reuse KV rather than vanish."""
    ids, labels = batch
    K, scale = 2, 5.0
    with torch.no_grad():
        go = ref.adaptive_forward(_with_router(gpt, K, 0.0, 40.0), ids, K, 0.5, scale, labels, 0.1)
        w = ref.NaiveWeights.from_model(gpt)
        assert max_abs(go.logits, ref.stepwise_logits(w, ids, K, scale)) < 1e-5
        assert (go.latent_steps == K).all()
        stop = ref.adaptive_forward(_with_router(gpt, K, 0.0, -40.0), ids, K, 0.5, scale, labels, 0.1)
        assert max_abs(stop.logits, ref.vanilla_logits(w, ids, scale)) < 1e-5
        assert (stop.latent_steps == 0).all()
        assert max_abs(stop.loss, ref.per_token_ce(stop.logits, labels)) < 1e-6  # r(t,1) ~ 0


def test_reference_adaptive_kv_reuse_differs_from_masking(gpt, batch):
    """Proves the KV-reuse rule is observable: with a real mix of halting steps, aliasing the
    halted slots to the last executed step's K/V differs from simply hiding them."""
    ids, labels = batch
    K, scale, tau = 3, 5.0, 0.4
    w = _with_router(gpt, K, 0.6, 0.5)
    with torch.no_grad():
        res = ref.adaptive_forward(w, ids, K, tau, scale, labels, 0.1)
        steps = set(res.latent_steps.flatten().tolist())
        assert len(steps) >= 3, steps
        orig_alias = ref.SlotDecoder.alias
        try:
            ref.SlotDecoder.alias = lambda self, slot, source: None  # masking: pruned slots invisible

            def run_masked(self, x, pos, slot, visible, _run=ref.SlotDecoder.run):
                return _run(self, x, pos, slot, [s for s in visible if s == slot or s in self.cache[0]])

            orig_run = ref.SlotDecoder.run
            ref.SlotDecoder.run = run_masked
            masked = ref.adaptive_forward(w, ids, K, tau, scale, labels, 0.1)
        finally:
            ref.SlotDecoder.alias = orig_alias
            ref.SlotDecoder.run = orig_run
    assert max_abs(masked.logits, res.logits) > 1e-3
