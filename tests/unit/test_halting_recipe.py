"""The adaptive recipe's choices (docs/method.md), each with a test that can fail: no pruning
during the halting warm-up (or pruning at the ramped threshold), the penalty ramp's value at
iteration i, the sampled penalty's expectation, fp32 router arithmetic under bf16 weights, and
the router's own optimizer group."""

from __future__ import annotations

import pytest
import torch

from megatron_lcot.model.halting import is_router_param
from megatron_lcot.model.halting_schedule import HaltingSchedule
from megatron_lcot.run_config import RunConfig
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


def forward(model, iteration=None):
    """The model's forward as the training loop calls it at `iteration` (None: as evaluation and
    tools call it, no settings handed)."""
    halting = None if iteration is None else HaltingSchedule(model.config).at(iteration)
    ids, labels = real_token_batch(B, T, VOCAB)
    return model(ids, torch.arange(T).expand(B, T), labels=labels, halting=halting)


def test_no_pruning_during_warmup_then_the_threshold_applies():
    model = adaptive_model(warmup=4).train()
    for iteration, expected_steps in [(0, 2.0), (3, 2.0), (4, 1.0), (50, 1.0)]:
        assert forward(model, iteration).latent_steps.unique().tolist() == [expected_steps], iteration
    model.eval()  # evaluation and inference prune as decoding does, warm-up or not
    assert forward(model, 0).latent_steps.unique().tolist() == [1.0]
    assert forward(model).latent_steps.unique().tolist() == [1.0]


def test_ramped_threshold_prunes_at_tau_i_over_w_during_warmup():
    """Fresh router: reach 0.9 after step 0, 0.81 after step 1. tau 0.95, W 10, ramped: tau_i =
    0.095 i, so iteration 5 (0.475) runs both steps, 9 (0.855) prunes step 2, and after the
    warm-up (0.95) no latent step runs; without the ramp iteration 9 runs both."""
    model = adaptive_model(warmup=10, threshold=0.95, halting_warmup_ramp_threshold=True).train()
    for iteration, expected_steps in [(0, 2.0), (5, 2.0), (9, 1.0), (10, 0.0)]:
        assert forward(model, iteration).latent_steps.unique().tolist() == [expected_steps], iteration
    model.config.halting_warmup_ramp_threshold = False
    assert forward(model, 9).latent_steps.unique().tolist() == [2.0]


def test_sampled_penalty_keeps_the_expectation():
    """--halting-penalty-fraction 0.5: each draw computes the term of exactly half the executed
    tokens (scaled by 2); over 300 draws (seeded by the iteration) the mean penalty equals the
    full one, per token within 25% and in total within 3%."""
    model = adaptive_model(warmup=0, threshold=0.0).train()
    full = forward(model, 0)
    penalty_full = full.loss - full.lm_loss
    model.config.halting_penalty_fraction = 0.5
    draws = []
    for iteration in range(300):
        out = forward(model, iteration)
        assert torch.equal(out.lm_loss, full.lm_loss)
        draws.append(out.loss - out.lm_loss)
    # K = 2 gates over B x T tokens, half of them sampled per gate: at most B T terms are nonzero
    assert int((draws[0] != 0).sum()) <= B * T
    mean = torch.stack(draws).mean(0)
    assert abs(mean.sum() / penalty_full.sum() - 1) < 0.03, (mean.sum(), penalty_full.sum())
    assert ((mean - penalty_full).abs() / penalty_full).max() < 0.25
    assert not torch.equal(draws[0], draws[1])  # the sample changes with the iteration


@pytest.mark.parametrize("iteration", [0, 1, 3])
def test_penalty_weight_ramps_linearly_during_warmup(iteration):
    """loss - lm_loss = lambda * i / W * penalty during the warm-up (no pruning: tau 0)."""
    model = adaptive_model(warmup=4, threshold=0.0).train()
    full = forward(model, 4)  # warm-up over: the full weight
    ramped = forward(model, iteration)
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
    output = forward(model.train(), 0)  # the whole adaptive forward runs with bf16 weights
    assert torch.isfinite(output.loss).all()


def test_router_parameters_get_their_own_group():
    from megatron_lcot.parallel.optimizer import build_lr_scheduler, build_optimizer

    model = adaptive_model(warmup=0)
    names = [name for name, p in model.named_parameters() if is_router_param(name, p)]
    assert names == ["halting_router.weight", "halting_router.bias"]
    assert is_router_param("module.halting_router.weight", None)
    assert not is_router_param("decoder.layers.0.mlp.linear_fc1.weight", None)
    config = RunConfig.from_values(  # every other field at its default
        dict(
            num_layers=model.config.num_layers,
            hidden_size=model.config.hidden_size,
            num_attention_heads=model.config.num_attention_heads,
            seq_length=16,
            latent_steps=model.config.latent_steps,
            lr=1e-3,
            min_lr=1e-4,
            weight_decay=0.1,
            adam_beta2=0.95,
            halting_router_lr_mult=0.1,
            train_iters=10,
        )
    )
    optimizer = build_optimizer([model], config)
    scheduler = build_lr_scheduler(optimizer, config.optimizer, config.training.train_iters)
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


def test_schedule_values_at_given_iterations():
    """HaltingSchedule.at(i): W 4, tau 0.2, lambda 0.3: no pruning and lambda i / 4 during the
    warm-up (tau i / 4 when ramped), the full values from i = W on; final() is evaluation's."""
    from megatron_lcot.model import llama_config

    def config(**fields):
        recipe = dict(
            halting_threshold=0.2,
            halting_loss_weight=0.3,
            halting_warmup_iters=4,
            halting_penalty_fraction=0.25,
            seed=7,
        )
        return llama_config(
            num_layers=1,
            hidden_size=64,
            num_attention_heads=4,
            latent_steps=2,
            halting="adaptive",
            **{**recipe, **fields},
        )

    plain, ramped = HaltingSchedule(config()), HaltingSchedule(config(halting_warmup_ramp_threshold=True))
    for i, ramp in [(0, 0.0), (1, 0.25), (3, 0.75), (4, 1.0), (100, 1.0)]:
        settings = plain.at(i)
        assert settings.loss_weight == pytest.approx(0.3 * ramp), i
        assert settings.threshold == pytest.approx(0.2 if ramp == 1.0 else 0.0), i
        assert ramped.at(i).threshold == pytest.approx(0.2 * ramp), i
        assert settings.penalty_fraction == 0.25 and settings.penalty_seed == 7 * 1_000_003 + i
    final = plain.final()
    assert (final.threshold, final.loss_weight, final.penalty_fraction) == (0.2, 0.3, 1.0)
    assert HaltingSchedule(config(halting_warmup_iters=0)).at(0).threshold == 0.2
