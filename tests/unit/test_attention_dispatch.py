"""The core attention's kernel choice (fp32, CPU): the dispatch policy per device and pass,
CUDA's plan executed on CPU tensors against the dense reference, and the log-sum-exp merge of
causal blocks against the materialised stepwise mask.

On CPU, SDPA with a mask and GQA runs CPU flash attention, so no memory measurement here can
show that CUDA would fall to the math kernel; the policy is tested instead, with the fused
kernels each CUDA call has under the installed torch's documented constraints.
"""

from __future__ import annotations

import pytest
import torch

from megatron_lcot.model import attention
from megatron_lcot.model.attention import attention_call, cuda_fused_kernels, dense_attention
from megatron_lcot.model.attention_pass import AttentionPass
from megatron_lcot.model.causal_blocks import causal_blocks_attention
from megatron_lcot.model.masking import stepwise_pass_mask
from tests.reference.helpers import single_thread_fixture
from tests.unit.test_equivalence_model import (
    GRAD_PARAMS,
    batch,  # noqa: F401  (fixture)
    positions,
)
from tests.unit.test_fast_paths import MODE_FIELDS, _backend_model, decisive_router

_single_thread = single_thread_fixture()

PASSES = [
    AttentionPass("causal"),
    AttentionPass("full"),
    AttentionPass("step_blocks", 2),
    AttentionPass("step_blocks", 3),
    AttentionPass("masked"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("described", PASSES, ids=lambda p: f"{p.kind}{p.blocks}")
def test_no_pass_reaches_the_math_kernel_on_cuda(described, dropout_p, dtype):
    """Proves every pass type, in every dtype, with and without dropout, gets a CUDA call that
    some fused kernel runs (flash, memory-efficient): none is left to SDPA's math kernel."""
    for backend in ("auto", "sdpa"):
        call = attention_call(backend, "cuda", described, dtype, dropout_p)
        assert call != "masked_gqa"
        assert cuda_fused_kernels(call, dtype), (described, dtype, call)


def test_dispatch_table_per_device():
    """Proves the table in attention.py's docstring: which call each pass makes on CUDA (bf16
    and fp32) and on CPU."""
    bf16, fp32 = torch.bfloat16, torch.float32
    want = {  # kind: (cuda bf16, cuda fp32, cpu fp32)
        "causal": ("flash_gqa", "unmasked_expanded", "flash_gqa"),
        "full": ("flash_gqa", "unmasked_expanded", "flash_gqa"),
        "step_blocks": ("causal_blocks", "masked_expanded", "masked_gqa"),
        "masked": ("masked_expanded", "masked_expanded", "masked_gqa"),
    }
    for kind, calls in want.items():
        described = AttentionPass(kind, 3 if kind == "step_blocks" else 1)
        got = (
            attention_call("auto", "cuda", described, bf16),
            attention_call("auto", "cuda", described, fp32),
            attention_call("auto", "cpu", described, fp32),
        )
        assert got == calls, kind
    assert (
        attention_call("auto", "cuda", AttentionPass("step_blocks", 2), bf16, dropout_p=0.1)
        == "masked_expanded"
    )
    assert attention_call("flex", "cuda", AttentionPass("masked"), bf16) == "flex"
    assert attention_call("dense", "cpu", AttentionPass("causal"), fp32) == "dense"


def test_mask_with_gqa_has_no_fused_cuda_kernel():
    """Proves the constraint table flags the call that used to run every masked latent pass
    (SDPA with a boolean mask and enable_gqa): on CUDA only the math kernel takes it."""
    assert cuda_fused_kernels("masked_gqa", torch.bfloat16) == ()
    assert cuda_fused_kernels("masked_expanded", torch.bfloat16) == ("efficient",)
    assert cuda_fused_kernels("flash_gqa", torch.bfloat16) == ("flash",)
    assert cuda_fused_kernels("flash_gqa", torch.float32) == ()
    assert cuda_fused_kernels("causal_blocks", torch.bfloat16) == ("flash",)


def test_attention_pass_refuses_unknown_kinds():
    """Proves a malformed pass description fails when built, naming the allowed kinds."""
    with pytest.raises(ValueError, match="kind must be one of"):
        AttentionPass("stepwise")
    with pytest.raises(ValueError, match="only with kind 'step_blocks'"):
        AttentionPass("causal", 2)


@pytest.mark.parametrize("num_blocks", [1, 2, 3])
def test_causal_blocks_equal_the_stepwise_mask(num_blocks):
    """Proves k+1 causal flash calls merged by log-sum-exp equal one attention under the
    stepwise pass mask (rows of step k, columns of steps 0..k), values and the gradients of
    query, keys and values, with grouped heads (8 query heads over 2 KV heads)."""
    gen = torch.Generator().manual_seed(3)
    b, heads, groups, tokens, dim = 2, 8, 2, 11, 16
    query = torch.randn(b, heads, tokens, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    key = torch.randn(
        b, groups, num_blocks * tokens, dim, generator=gen, dtype=torch.float64, requires_grad=True
    )
    value = torch.randn(
        b, groups, num_blocks * tokens, dim, generator=gen, dtype=torch.float64, requires_grad=True
    )
    grad_out = torch.randn(b, heads, tokens, dim, generator=gen, dtype=torch.float64)
    got = causal_blocks_attention(query, key, value, num_blocks, 0.3)
    want = dense_attention(query, key, value, stepwise_pass_mask(tokens, num_blocks - 1), False, 0.3)
    assert (got - want).abs().max() < 1e-6
    for g, w in zip(
        torch.autograd.grad(got, (query, key, value), grad_out),
        torch.autograd.grad(want, (query, key, value), grad_out),
    ):
        assert (g - w).abs().max() < 1e-6


def test_causal_blocks_refuses_keys_that_are_not_whole_blocks():
    query = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="are not 2 blocks of 4"):
        causal_blocks_attention(query, torch.zeros(1, 2, 9, 8), torch.zeros(1, 2, 9, 8), 2, 1.0)


@pytest.mark.parametrize("mode", ["vanilla", "stepwise", "adaptive", "interleaved"])
def test_cuda_plan_equals_dense_reference(batch, mode, monkeypatch):  # noqa: F811
    """Proves the calls CUDA makes in bf16 (flash with GQA, causal blocks merged by LSE,
    expanded-head masked SDPA), executed on CPU tensors, give the dense reference's loss and
    gradients in every mode, and that each mode makes the calls the table says."""
    ids, labels = batch
    fields = MODE_FIELDS[mode]
    fused, dense = _backend_model("auto", **fields), _backend_model("dense", **fields)
    if mode == "adaptive":
        decisive_router(fused)
    dense.load_state_dict(fused.state_dict())
    calls = set()

    def cuda_bf16_call(backend, device_type, described, dtype, dropout_p=0.0):
        call = attention_call(backend, "cuda", described, torch.bfloat16, dropout_p)
        if backend != "dense":
            calls.add(call)
            assert cuda_fused_kernels(call, torch.bfloat16), call
        return call

    monkeypatch.setattr(attention, "attention_call", cuda_bf16_call)
    losses, grads = {}, {}
    for name, model in (("fused", fused), ("dense", dense)):
        model.train()
        loss = model(ids, positions(), labels=labels).loss.mean()
        params = [dict(model.named_parameters())[param] for param in GRAD_PARAMS]
        losses[name], grads[name] = loss.item(), torch.autograd.grad(loss, params)
    want_calls = {
        "vanilla": {"flash_gqa"},
        "interleaved": {"flash_gqa"},
        "stepwise": {"flash_gqa", "causal_blocks"},
        "adaptive": {"flash_gqa", "masked_expanded"},
    }[mode]  # its router halts some at every step
    assert calls == want_calls
    assert abs(losses["fused"] - losses["dense"]) < 1e-5
    for name, got, want in zip(GRAD_PARAMS, grads["fused"], grads["dense"]):
        assert (got - want).norm() / want.norm() < 1e-5, name
