"""The two pieces of pipeline_passes.py that carry latent passes across stages, in one process:
the payload (hidden rows + the next pass's halting decision) and the hand-over of tensors a
later chunk reads (detached twin, gradient injected into the producing chunk's backward).
The end-to-end check against one process is tests/distributed/test_pipeline_equivalence.py."""

from __future__ import annotations

import torch

from megatron_lcot.parallel.pipeline_passes import (
    InjectGrads,
    halting_rows,
    hand_over,
    pack_payload,
    unpack_payload,
)


def test_payload_round_trip_keeps_hidden_rows_and_decision():
    torch.manual_seed(0)
    for num_tokens, hidden_size in ((5, 8), (17, 8), (16, 8)):  # R = 1, 3, 2 flag rows
        hidden = torch.randn(num_tokens * 2, 3, hidden_size)  # T' = 2T rows (interleaved K=1)
        executing = torch.rand(num_tokens, 3) > 0.5
        payload = pack_payload(hidden, executing)
        assert payload.shape == (num_tokens * 2 + halting_rows(num_tokens, hidden_size), 3, hidden_size)
        got_hidden, got_executing = unpack_payload(payload, num_tokens)
        assert torch.equal(got_hidden, hidden) and torch.equal(got_executing, executing)


def test_handed_over_tensor_gets_its_gradient_in_the_producing_chunks_backward():
    """Chunk 1 makes `a`; chunk 2 reads it (as pass k+1 reads pass k's keys) and produces the
    loss. Backward runs as the schedule runs it: chunk 2 first, then chunk 1 from its output
    gradient alone. The weight's gradient must equal that of one attached graph."""
    torch.manual_seed(0)
    weight = torch.randn(4, 4, requires_grad=True)
    inputs = torch.randn(3, 4)

    def reference():
        a = torch.tanh(inputs @ weight)
        out1 = a * 2
        return ((out1 @ weight).sin() + a.cos()).sum()

    reference().backward()
    want = weight.grad.clone()
    weight.grad = None

    a = torch.tanh(inputs @ weight)
    twin = hand_over(a)
    out1 = InjectGrads.apply(a * 2, [twin], a)  # chunk 1's output (sent to chunk 2)
    received = out1.detach().requires_grad_()  # what the p2p hop delivers
    loss = ((received @ weight).sin() + twin.cos()).sum()  # chunk 2 reads `a` through its twin
    loss.backward()  # chunk 2's backward: fills twin.grad and received.grad
    torch.autograd.backward(out1, received.grad)  # chunk 1's backward from its output gradient
    torch.testing.assert_close(weight.grad, want, rtol=1e-6, atol=1e-7)
    difference = (weight.grad - want).abs().max()

    weight.grad = None  # without the injection the twin's gradient is lost: visibly different
    a = torch.tanh(inputs @ weight)
    out1 = a * 2
    received = out1.detach().requires_grad_()
    ((received @ weight).sin() + hand_over(a).cos()).sum().backward()
    torch.autograd.backward(out1, received.grad)
    assert (weight.grad - want).abs().max() > 1e-3 > difference
