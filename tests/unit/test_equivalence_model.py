"""Equivalence of megatron_lcot's model with independent references (fp32, CPU).

The references (tests/reference/naive_lm.py, validated in test_equivalence_reference.py against
megatron-core's GPTModel) read the model's weights and recompute everything with plain torch ops,
one slot at a time with explicit per-layer KV caches; they share no code with the model's
schedules, masks, rotary or halting modules. Inputs are real text (byte-level State of the Union
windows, tests/reference/helpers.py); norm weights are randomised so a misplaced norm shows.
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

VOCAB, T, B, MAX_LEN = 320, 12, 2, 64
SEED = 4321
# adaptive fixture: a router large enough that tokens halt at different steps
# (beta < 1 keeps the penalty well above float resolution with an untrained model, whose p(gold) ~ 1/V)
ADAPTIVE = dict(K=3, tau=0.4, router_std=0.6, router_bias=0.5, loss_weight=0.7, exponent=0.5)
# the entropy router, its entropy term (~0.97-1.0 x a_k for an untrained model) moving the gates
ENTROPY_ROUTER = dict(router="entropy", router_bias=-2.0, entropy_weight=[2.5, 3.0, 2.0])


def lcot_config(**fields):
    from megatron_lcot.model.config import llama_config

    return llama_config(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, num_query_groups=2, **fields
    )


def build(config, seed=SEED):
    """The project's model for `config`, fp32, eval mode, with non-trivial norm weights."""
    from megatron_lcot.model import build_lcot_model

    init_megatron(seed)
    model = build_lcot_model(config, vocab_size=VOCAB, max_sequence_length=MAX_LEN)
    randomize_norm_weights(model, seed)
    model.eval()
    return model


def positions():
    return torch.arange(T).expand(B, T)


@pytest.fixture(scope="module")
def batch():
    return real_token_batch(B, T, VOCAB)


def adaptive_model(**overrides):
    a = {**ADAPTIVE, **overrides}
    model = build(
        lcot_config(
            latent_steps=a["K"],
            latent_layout="stepwise",
            halting="adaptive",
            halting_threshold=a["tau"],
            halting_loss_weight=a["loss_weight"],
            halting_correctness_exponent=a["exponent"],
            halting_router=a.get("router", "linear"),
        )
    )
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        model.halting_router.weight.copy_(
            a["router_std"] * torch.randn(model.halting_router.weight.shape, generator=gen)
        )
        model.halting_router.bias.fill_(a["router_bias"])
        if "entropy_weight" in a:
            model.halting_router.entropy_weight.copy_(torch.tensor(a["entropy_weight"]))
    return model


def ref_adaptive(model, ids, labels=None):
    c = model.config
    return ref.adaptive_forward(
        ref.NaiveWeights.from_model(model),
        ids,
        c.latent_steps,
        c.halting_threshold,
        c.embedding_scale,
        labels=labels,
        loss_weight=c.halting_loss_weight,
        correctness_exponent=c.halting_correctness_exponent,
    )


def assert_real_halting_mix(res, tau):
    """The adaptive fixture must exercise pruning: several distinct executed-step counts, and no
    reach so close to tau that float rounding could flip a decision."""
    counts = sorted(set(res.latent_steps.flatten().tolist()))
    assert len(counts) >= 3, f"halting fixture too uniform: executed latent steps {counts}"
    reach = res.reach[~torch.isnan(res.reach)]
    assert (reach - tau).abs().min() > 1e-4


# ----------------------------------------------------------------------------------------------


def test_vanilla_equals_megatron_gptmodel(batch):
    """Proves latent_steps = 0 *is* megatron-core's GPTModel: the project's model (its own core
    attention, its spec) and a GPTModel (local spec, megatron's DotProductAttention) loaded with
    the same state_dict give the same logits (atol 1e-5) and per-token loss; and both equal the
    naive reference."""
    ids, labels = batch
    model = build(lcot_config(latent_steps=0))
    gpt = build_gpt_model(model.config, VOCAB, MAX_LEN)
    gpt.load_state_dict(model.state_dict(), strict=True)
    gpt.eval()
    with torch.no_grad():
        logits = model(ids, positions(), attention_mask=None).logits
        want = gpt(ids, positions(), attention_mask=None)
        out = model(ids, positions(), attention_mask=None, labels=labels)
        want_loss = gpt(ids, positions(), attention_mask=None, labels=labels)
        naive = ref.vanilla_logits(ref.NaiveWeights.from_model(model), ids)
    assert logits.shape == (B, T, VOCAB)
    assert max_abs(logits, want) < 1e-5
    assert max_abs(out.loss, want_loss) < 1e-5 and max_abs(out.lm_loss, want_loss) < 1e-5
    assert max_abs(logits, naive) < 1e-5


def test_stepwise_fixed_k_equals_naive_reference(batch):
    """Proves the stepwise fixed-K schedule (K+1 passes, per-layer KV store, pass masks, slot
    positions, feedback of the final-normed state, embedding scale) equals naive token-by-token
    decoding in which slot (t,k) sees (t',k') iff t' <= t and k' <= k, all at position t:
    logits atol 1e-4, per-token loss, and K executed steps for every token."""
    ids, labels = batch
    K = 2
    model = build(lcot_config(latent_steps=K, latent_layout="stepwise", halting="none"))
    with torch.no_grad():
        logits = model(ids, positions()).logits
        out = model(ids, positions(), labels=labels)
        want = ref.stepwise_logits(ref.NaiveWeights.from_model(model), ids, K, model.config.embedding_scale)
    assert max_abs(logits, want) < 1e-4
    assert max_abs(out.lm_loss, ref.per_token_ce(want, labels)) < 1e-4
    assert max_abs(out.loss, out.lm_loss) == 0.0
    assert (out.latent_steps == K).all()
    assert max_abs(out.expected_latent_steps, torch.full((B, T), float(K))) == 0.0


@pytest.mark.parametrize("router", [{}, ENTROPY_ROUTER], ids=["linear", "entropy"])
def test_adaptive_equals_naive_reference(batch, router):
    """Proves adaptive halting equals the naive reference with a real mix of halting steps:
    router gates (the linear router's, or the entropy router's reading its step's prediction),
    reach, the hard live rule r >= tau, exit-mass mixture with pruned mass moved to
    the last executed step, KV reuse of halted slots in every layer, the correctness-aware penalty
    (lambda, beta from config), executed and expected latent steps."""
    ids, labels = batch
    model = adaptive_model(**router)
    with torch.no_grad():
        want = ref_adaptive(model, ids, labels)
        assert_real_halting_mix(want, model.config.halting_threshold)
        logits = model(ids, positions()).logits
        out = model(ids, positions(), labels=labels)
    assert max_abs(logits, want.logits) < 1e-4
    assert torch.equal(out.latent_steps.long(), want.latent_steps)
    assert max_abs(out.expected_latent_steps, want.expected_latent_steps) < 1e-5
    assert max_abs(out.lm_loss, want.lm_loss) < 1e-4
    assert max_abs(out.loss, want.loss) < 1e-4
    # the penalty itself, which must be large enough to be seen next to the CE
    assert want.penalty.mean() > 1e-2, want.penalty.mean()
    assert max_abs((out.loss - out.lm_loss) / model.config.halting_loss_weight, want.penalty) < 1e-4


@pytest.mark.parametrize("router", [{}, ENTROPY_ROUTER], ids=["linear", "entropy"])
def test_head_statistics_in_row_chunks_equal_one_chunk(batch, monkeypatch, router):
    """The forward-only LM head statistics (the penalty's gold NLL, the entropy router's entropy)
    computed a few rows at a time (vocab_parallel.head_statistic) give the losses and halting of
    one chunk: chunking only bounds the logits a chunk holds. (Bitwise on this machine's BLAS;
    the tolerance admits a matmul that rounds a last bit differently for another row count.)"""
    from megatron_lcot.model import vocab_parallel

    ids, labels = batch
    model = adaptive_model(**router)
    calls = []  # rows of each LM head call on [rows, 1, h]: the statistics' (the loss's is [T, B, h])
    model.output_layer.register_forward_hook(
        lambda module, args, output: calls.append(len(args[0])) if args[0].shape[1] == 1 else None
    )
    with torch.no_grad():
        one_chunk = model(ids, positions(), labels=labels)
        one_chunk_calls, calls[:] = list(calls), []
        monkeypatch.setitem(vocab_parallel.LOGITS_CHUNK_BYTES, "cpu", 4 * VOCAB * 5)  # 5 rows a chunk
        chunked = model(ids, positions(), labels=labels)
    assert max(calls) == 5 and len(calls) > len(one_chunk_calls) and sum(calls) == sum(one_chunk_calls)
    assert (one_chunk.loss - one_chunk.lm_loss).mean() > 1e-2  # the penalty is there
    assert max_abs(chunked.loss, one_chunk.loss) < 1e-6
    assert torch.equal(chunked.latent_steps, one_chunk.latent_steps)
    assert max_abs(chunked.expected_latent_steps, one_chunk.expected_latent_steps) < 1e-6


@pytest.mark.parametrize("router_bias", [-40.0, 40.0], ids=["all-halt", "none-halt"])
def test_adaptive_extremes(batch, router_bias):
    """Proves the adaptive model's edge paths: when every token halts after step 0 (the schedule
    stops early) it gives the step-0 (vanilla, scaled-embedding) logits with 0 latent steps and a
    penalty of r(t,1) p(t,0)^beta ~ 0; when no token halts it gives the stepwise fixed-K logits."""
    ids, labels = batch
    model = adaptive_model(router_std=0.0, router_bias=router_bias)
    c = model.config
    with torch.no_grad():
        out = model(ids, positions(), labels=labels)
        logits = model(ids, positions()).logits
        want = ref_adaptive(model, ids, labels)
        w = ref.NaiveWeights.from_model(model)
        if router_bias < 0:
            plain, steps = ref.vanilla_logits(w, ids, c.embedding_scale), 0
        else:
            plain, steps = ref.stepwise_logits(w, ids, c.latent_steps, c.embedding_scale), c.latent_steps
    assert (want.latent_steps == steps).all() and (out.latent_steps == steps).all()
    assert max_abs(want.logits, plain) < 1e-5
    assert max_abs(logits, want.logits) < 1e-4
    assert max_abs(out.loss, want.loss) < 1e-4
    assert max_abs(out.expected_latent_steps, want.expected_latent_steps) < 1e-5


@pytest.mark.parametrize("jacobi_iters", [0, 1, 2])
def test_interleaved_jacobi_equals_naive_jacobi(batch, jacobi_iters):
    """Proves the interleaved schedule runs exactly PonderLM-2's Jacobi iteration: warm-up passes
    over steps 0..k-1, J parallel updates of every thought from the previous pass, a last pass;
    causal mask over x1 z11..z1K x2 ..., every slot of token t at RoPE position t. Compared with
    a plain full-sequence loop at J = 0, 1, 2 (logits atol 1e-4, loss)."""
    ids, labels = batch
    K = 2
    model = build(lcot_config(latent_steps=K, latent_layout="interleaved"))
    with torch.no_grad():
        logits = model(ids, positions(), jacobi_iters=jacobi_iters).logits
        out = model(ids, positions(), labels=labels, jacobi_iters=jacobi_iters)
        want = ref.interleaved_jacobi_logits(
            ref.NaiveWeights.from_model(model), ids, K, jacobi_iters, model.config.embedding_scale
        )
    assert max_abs(logits, want) < 1e-4
    assert max_abs(out.lm_loss, ref.per_token_ce(want, labels)) < 1e-4


def test_interleaved_converged_equals_sequential_decoding(batch):
    """Proves the interleaved model at J = T(K+1) Jacobi iterations reaches the exact sequential
    answer (naive slot-by-slot decoding with a KV cache, the inference semantics)."""
    ids, _ = batch
    K = 2
    model = build(lcot_config(latent_steps=K, latent_layout="interleaved"))
    with torch.no_grad():
        logits = model(ids, positions(), jacobi_iters=T * (K + 1)).logits
        want = ref.interleaved_sequential_logits(
            ref.NaiveWeights.from_model(model), ids, K, model.config.embedding_scale
        )
    assert max_abs(logits, want) < 1e-4


# ----------------------------------------------------------------------------------------------
# Gradients (in training mode, as the training loop runs the model)

GRAD_PARAMS = [
    "embedding.word_embeddings.weight",
    "decoder.layers.0.self_attention.linear_qkv.weight",
    "decoder.layers.0.input_layernorm.weight",
    "decoder.layers.1.mlp.linear_fc1.weight",
    "decoder.layers.1.self_attention.linear_proj.weight",
    "decoder.final_layernorm.weight",
    "output_layer.weight",
]


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=False)


def _assert_grads_close(model, model_loss, ref_loss, names):
    params = [dict(model.named_parameters())[n] for n in names]
    got = _grads(model_loss, params)
    want = _grads(ref_loss, params)
    for name, g, w in zip(names, got, want):
        rel = (g - w).norm() / w.norm().clamp_min(1e-12)
        assert w.norm() > 0, name
        assert rel < 1e-4, f"{name}: relative gradient error {rel:.2e}"


def test_stepwise_gradients_equal_reference(batch):
    """Proves backward through the stepwise schedule (KV store across passes, feedback of states)
    gives autograd's gradients of the naive reference's mean loss (relative error < 1e-4)."""
    ids, labels = batch
    K = 2
    model = build(lcot_config(latent_steps=K, latent_layout="stepwise", halting="none")).train()
    loss = model(ids, positions(), labels=labels).loss.mean()
    want = ref.per_token_ce(
        ref.stepwise_logits(ref.NaiveWeights.from_model(model), ids, K, model.config.embedding_scale), labels
    ).mean()
    _assert_grads_close(model, loss, want, GRAD_PARAMS)


ROUTER_PARAMS = ["halting_router.weight", "halting_router.bias"]


@pytest.mark.parametrize(
    "router, router_params",
    [({}, ROUTER_PARAMS), (ENTROPY_ROUTER, ROUTER_PARAMS + ["halting_router.entropy_weight"])],
    ids=["linear", "entropy"],
)
def test_adaptive_gradients_equal_reference(batch, router, router_params):
    """Proves the adaptive loss's gradients (through the exit-mass mixture, the reach products,
    the penalty's reach with stop-gradient on p, and the reused keys/values of halted slots)
    equal autograd through the naive reference, including the router's own parameters."""
    ids, labels = batch
    model = adaptive_model(**router).train()
    out = model(ids, positions(), labels=labels)
    want = ref_adaptive(model, ids, labels)
    assert_real_halting_mix(want, model.config.halting_threshold)
    _assert_grads_close(model, out.loss.mean(), want.loss.mean(), GRAD_PARAMS + router_params)


def test_interleaved_gradients_equal_reference(batch):
    """Proves gradients flow through every Jacobi pass exactly as in the plain loop (J = 1)."""
    ids, labels = batch
    K = 2
    model = build(lcot_config(latent_steps=K, latent_layout="interleaved")).train()
    loss = model(ids, positions(), labels=labels, jacobi_iters=1).loss.mean()
    want = ref.per_token_ce(
        ref.interleaved_jacobi_logits(
            ref.NaiveWeights.from_model(model), ids, K, 1, model.config.embedding_scale
        ),
        labels,
    ).mean()
    _assert_grads_close(model, loss, want, GRAD_PARAMS)
