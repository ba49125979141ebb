"""`--torch-compile` (training/compiled_layers.py) against the same model uncompiled (fp32, CPU).

Two copies of the model from one seed train a few SGD steps on real-text batches, one with its
decoder layers compiled by inductor (dynamic shapes): losses and every gradient agree within
float tolerance, vanilla and adaptive halting (packed live widths that change from step to step).
The flag's refusals name the flag.
"""

from __future__ import annotations

import pytest
import torch

from megatron_lcot.training.compiled_layers import compile_decoder_layers
from tests.reference.helpers import real_token_batch
from tests.unit.test_equivalence_model import VOCAB, B, T, adaptive_model, build, lcot_config, positions

STEPS = 3
# batches at different stretches of the text: each step's tokens halt differently
BATCHES = [real_token_batch(B, T, VOCAB, offset=1000 + 577 * step) for step in range(STEPS)]


def _train(model) -> tuple:
    """STEPS SGD steps; (losses, gradients per step)."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses, grads = [], []
    for ids, labels in BATCHES:
        optimizer.zero_grad()
        loss = model(ids, positions(), labels=labels).loss.mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        optimizer.step()
    return losses, grads


def _packed_widths(model) -> list:
    """Token rows of every call of the first decoder layer (the packed widths of halting passes)."""
    widths = []

    def record(module, args, kwargs):
        widths.append(kwargs["hidden_states"].shape[0] if "hidden_states" in kwargs else args[0].shape[0])

    model.decoder.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    return widths


def _assert_compiled_trains_as_eager(make_model) -> tuple:
    """make_model() twice (one seed: the same weights); the second copy compiled."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, compiled = make_model(), make_model()
    assert compile_decoder_layers(compiled) == len(model.decoder.layers)
    widths = _packed_widths(model)
    want_losses, want_grads = _train(model)
    got_losses, got_grads = _train(compiled)
    for step in range(STEPS):
        torch.testing.assert_close(got_losses[step], want_losses[step], rtol=1e-5, atol=1e-6)
        assert got_grads[step].keys() == want_grads[step].keys()
        for name, grad in want_grads[step].items():
            torch.testing.assert_close(got_grads[step][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    return model, widths, dict(torch._dynamo.utils.counters["stats"])


@pytest.mark.slow
def test_compiled_vanilla_trains_as_eager():
    _, _, stats = _assert_compiled_trains_as_eager(lambda: build(lcot_config(latent_steps=0)))
    assert stats["unique_graphs"] >= 1  # the layers really ran compiled


@pytest.mark.slow
def test_compiled_adaptive_trains_as_eager():
    model, widths, stats = _assert_compiled_trains_as_eager(adaptive_model)
    packed = set(widths) - {T}
    assert len(packed) >= 4, f"the halting fixture packs too few distinct widths: {sorted(set(widths))}"
    assert stats["unique_graphs"] >= 1  # the layers really ran compiled


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--deepspeed"], "--deepspeed"),
        (["--recompute-granularity", "full"], "--recompute-granularity full"),
        (["--attention-backend", "flex"], "--attention-backend flex"),
    ],
)
def test_torch_compile_refuses_what_it_was_not_tested_with(extra, named):
    from megatron_lcot.arguments import ArgumentError, parse_args
    from tests.unit.test_run_config import FLAGS

    with pytest.raises(ArgumentError, match=f"--torch-compile is not supported with {named}"):
        parse_args([*FLAGS, "--torch-compile", *extra])
