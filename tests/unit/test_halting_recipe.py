"""The stable adaptive recipe's choices (docs/method.md), each with a test that can fail:
no pruning during the halting warm-up, the penalty ramp's value at iteration i, fp32 router
arithmetic under bf16 weights, and the router's own optimizer group."""

from __future__ import annotations

import argparse

import pytest
import torch

from megatron_lcot.model.halting import is_router_param, set_training_iteration
from megatron_lcot.run_config import OptimizerSection, section_from_values
from tests.reference.helpers import init_megatron, real_token_batch, single_thread_fixture

_single_thread = single_thread_fixture()

VOCAB, T, B, K = 320, 12, 2, 2


def adaptive_model(warmup: int, threshold: float = 0.85, loss_weight: float = 0.5, **fields):
    """K=2 adaptive model whose fresh router (continue prob 0.9) prunes step 2 at tau 0.85
    (reach 0.81) unless the warm-up keeps every step."""
    from megatron_lcot.model import build_lcot_model, llama_config

    config = llama_config(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        num_query_groups=2,
        latent_steps=K,
        halting="adaptive",
        halting_threshold=threshold,
        halting_loss_weight=loss_weight,
        halting_correctness_exponent=0.5,
        halting_warmup_iters=warmup,
        **fields,
    )
    init_megatron(5)
    return build_lcot_model(config, vocab_size=VOCAB, max_sequence_length=64)


def forward(model):
    ids, labels = real_token_batch(B, T, VOCAB)
    return model(ids, torch.arange(T).expand(B, T), labels=labels)


def test_no_pruning_during_warmup_then_the_threshold_applies():
    model = adaptive_model(warmup=4).train()
    for iteration, expected_steps in [(0, 2.0), (3, 2.0), (4, 1.0), (50, 1.0)]:
        set_training_iteration(model, iteration)
        assert forward(model).latent_steps.unique().tolist() == [expected_steps], iteration
    set_training_iteration(model, 0)
    model.eval()  # evaluation and inference prune as decoding does, warm-up or not
    assert forward(model).latent_steps.unique().tolist() == [1.0]


@pytest.mark.parametrize("iteration", [0, 1, 3])
def test_penalty_weight_ramps_linearly_during_warmup(iteration):
    """loss - lm_loss = lambda * i / W * penalty during the warm-up (no pruning: tau 0)."""
    model = adaptive_model(warmup=4, threshold=0.0).train()
    set_training_iteration(model, 4)  # warm-up over: the full weight
    full = forward(model)
    set_training_iteration(model, iteration)
    ramped = forward(model)
    assert torch.equal(ramped.lm_loss, full.lm_loss)
    penalty_full = full.loss - full.lm_loss
    assert penalty_full.abs().min() > 1e-2  # the penalty is really there (ulp of the loss: 5e-7)
    torch.testing.assert_close(
        ramped.loss - ramped.lm_loss, penalty_full * iteration / 4, rtol=1e-5, atol=1e-6
    )


def test_router_is_fp32_under_bf16_weights():
    """bf16 decoder, fp32 router weights and gates: the gates equal an fp64 computation from the
    same bf16 step states (bf16 gate arithmetic is off by up to ~4e-3, flipping decisions)."""
    model = adaptive_model(warmup=0, params_dtype=torch.bfloat16)
    router = model.halting_router
    assert router.weight.dtype == torch.float32 and router.bias.dtype == torch.float32
    assert model.decoder.layers[0].mlp.linear_fc1.weight.dtype == torch.bfloat16
    with torch.no_grad():
        router.weight.copy_(
            0.3 * torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(3))
        )
    state = torch.randn(T, B, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    gate = router(state, 1)
    assert gate.dtype == torch.float32
    exact = torch.sigmoid(state.double() @ router.weight[1].double() + router.bias[1].double())
    assert (gate.double() - exact).abs().max() < 1e-6
    output = forward(model.train())  # the whole adaptive forward runs with bf16 weights
    assert torch.isfinite(output.loss).all()


def test_router_parameters_get_their_own_group():
    from megatron_lcot.parallel.optimizer import build_lr_scheduler, build_optimizer

    model = adaptive_model(warmup=0)
    names = [name for name, p in model.named_parameters() if is_router_param(name, p)]
    assert names == ["halting_router.weight", "halting_router.bias"]
    assert is_router_param("module.halting_router.weight", None)
    assert not is_router_param("decoder.layers.0.mlp.linear_fc1.weight", None)
    args = argparse.Namespace(
        lr=1e-3,
        min_lr=1e-4,
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_eps=1e-8,
        clip_grad=1.0,
        halting_router_lr_mult=0.1,
        lr_warmup_iters=0,
        train_iters=10,
        lr_decay_style="cosine",
        bf16=False,
        fp16=False,
        loss_scale=None,
        initial_loss_scale=2.0**32,
        use_distributed_optimizer=False,
        overlap_grad_reduce=True,
        overlap_param_gather=True,
        pipeline_model_parallel_size=1,
        latent_steps=model.config.latent_steps,
        deepspeed=False,
    )
    optimizer = build_optimizer([model], args)
    scheduler = build_lr_scheduler(optimizer, section_from_values(OptimizerSection, args), args.train_iters)
    scheduler.step(1)
    router_params = [model.halting_router.weight, model.halting_router.bias]
    (router,) = [g for g in optimizer.param_groups if any(p is router_params[0] for p in g["params"])]
    (main,) = [g for g in optimizer.param_groups if g["wd_mult"] == 1.0]
    assert len(router["params"]) == 2 and all(any(p is q for q in router["params"]) for p in router_params)
    assert router["weight_decay"] == 0.0 and main["weight_decay"] == pytest.approx(0.1)
    assert router["lr"] == pytest.approx(0.1 * main["lr"])
    scheduler.step(20)  # past the decay: min_lr scaled too
    assert router["lr"] == pytest.approx(1e-5) and main["lr"] == pytest.approx(1e-4)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
