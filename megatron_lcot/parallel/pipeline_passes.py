"""Latent passes across pipeline stages: pass k = virtual pipeline chunk k (docs/architecture.md,
"Latent passes across pipeline stages").

megatron-core's interleaved schedule sends the last stage's output of chunk c to the first
stage's chunk c+1, which is the latent recurrence (pass k's final-normed output is pass k+1's
input). So each stage's one model is wrapped in V `PassChunk`s sharing its weights, and
`pipeline_schedule()` hands them to `forward_backward_pipelining_with_interleaving`:

* what crosses the stages is the **payload** [T' + R, b, h]: the hidden rows, then
  R = ceil(T / h) rows carrying the next pass's halting decision (`executing` [T, b]), decided
  on the last stage and read by every stage, so KV reuse is identical everywhere;
* what a later pass reads on the same stage (its layers' keys/values of earlier passes; on the
  last stage the step states for the exit-mass mixture and the loss) is handed over detached,
  and the producing chunk's output is wrapped in `InjectGrads`, whose backward returns the
  gradients those leaves accumulated. The schedule runs chunk k's backward after every later
  chunk's on the same stage, so they are complete by then.

Per-micro-batch state lives in `StagePasses` for one schedule call; the model itself is the
stage's LcotGPTModel (`pre_process` / `post_process` say which ends it holds).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model

from megatron_lcot.model.engine import LatentRun


class InjectGrads(torch.autograd.Function):
    """Identity on `output`; its backward also gives each of `originals` the gradient that its
    detached twin in `leaves` accumulated in later chunks' backward (None: never used)."""

    @staticmethod
    def forward(ctx, output, leaves, *originals):
        ctx.leaves = leaves
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        return (grad, None, *(leaf.grad for leaf in ctx.leaves))


class KeepInputGradient(torch.autograd.Function):
    """Identity on `loss`; its backward also gives `received` (the chunk's input) a zero
    gradient. The last chunk's loss need not read its pass's outputs (a pass no token executed
    contributes nothing to the exit-mass mixture), but the schedule sends the input's gradient
    back to the previous stage, which waits for it."""

    @staticmethod
    def forward(ctx, loss, received):
        ctx.received_shape, ctx.received_dtype = received.shape, received.dtype
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_zeros(ctx.received_shape, dtype=ctx.received_dtype)


def hand_over(tensor: torch.Tensor) -> torch.Tensor:
    """A detached twin of `tensor` that collects the gradient of later chunks' uses."""
    return tensor.detach().requires_grad_(tensor.requires_grad)


def halting_rows(num_tokens: int, hidden_size: int) -> int:
    """R: payload rows that carry one flag per token (h tokens per row)."""
    return math.ceil(num_tokens / hidden_size)


def pack_payload(hidden: torch.Tensor, executing: torch.Tensor | None) -> torch.Tensor:
    """hidden [T', b, h] + executing [T, b] bool (None: all) -> payload [T' + R, b, h]."""
    num_tokens, batch, width = executing.shape[0], hidden.shape[1], hidden.shape[2]
    rows = halting_rows(num_tokens, width)
    flags = hidden.new_zeros(rows * width, batch)
    flags[:num_tokens] = executing.to(hidden.dtype)
    return torch.cat([hidden, flags.view(rows, width, batch).transpose(1, 2)])


def unpack_payload(payload: torch.Tensor, num_tokens: int) -> tuple:
    """payload [T' + R, b, h] -> (hidden [T', b, h], executing [T, b] bool)."""
    rows = halting_rows(num_tokens, payload.shape[2])
    flags = payload[-rows:].detach().transpose(1, 2).reshape(-1, payload.shape[1])
    return payload[:-rows], flags[:num_tokens] > 0.5


class StageBlock:
    """This stage's TransformerBlock as a function of the hidden states it is called with.

    megatron-core's block on a non-first stage ignores its `hidden_states` argument and reads
    `input_tensor`; setting that to whatever a pass runs (all rows, or only the live tokens'
    packed rows) keeps the engine's pass functions valid on every stage.
    """

    def __init__(self, decoder):
        self.decoder = decoder
        self.config = decoder.config

    def __call__(self, hidden_states, **kwargs):
        self.decoder.set_input_tensor(hidden_states)
        return self.decoder(hidden_states=hidden_states, **kwargs)


def hand_over_run(run: LatentRun) -> tuple:
    """Replace every tensor of `run` that a later chunk reads and that still belongs to this
    chunk's graph (the store's entries, the step states, the token states and a schedule's
    slots) by a detached twin: (originals, twins). Reach is not handed over: its graph holds
    only the router's parameters and handed-over step states, and the last chunk reads it once."""
    originals, twins = [], []

    def twin(tensor):
        if tensor is None or tensor.grad_fn is None:
            return tensor
        originals.append(tensor)
        twins.append(hand_over(tensor))
        return twins[-1]

    for streams in (*run.store.keys.values(), *run.store.values.values()):
        for stream in streams:
            streams[stream] = twin(streams[stream])
    run.step_states = [twin(state) for state in run.step_states]
    run.token_states, run.slots = twin(run.token_states), twin(run.slots)
    return originals, twins


class StagePasses:
    """One schedule call's latent passes on this stage: V chunks over one LcotGPTModel.

    The schedule runs each chunk's micro-batches in order, so chunk k's n-th forward is
    micro-batch n; its `LatentRun` is dropped after the last chunk's forward (the autograd graph
    and `InjectGrads` keep what backward needs). Which pass a chunk runs and what it does is the
    model's latent schedule's (model/latent.py): nothing here knows the layout.
    """

    def __init__(self, model, num_passes: int):
        self.model = model
        self.schedule = model.latent_schedule
        self.config = model.config
        self.num_passes = num_passes
        self.forwards = [0] * num_passes
        self.micro_batches: dict = {}
        self.chunks = [PassChunk(self, index) for index in range(num_passes)]

    def _run(self, index: int, input_ids, threshold: float) -> LatentRun:
        micro_batch = self.forwards[index]
        self.forwards[index] += 1
        if index == 0:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            run = LatentRun.start(
                None, self.model.rotary_pos_emb, positions, input_ids.shape[0], threshold=threshold
            )
            self.schedule.start(run)
            self.micro_batches[micro_batch] = run
        if index == self.num_passes - 1:
            return self.micro_batches.pop(micro_batch)
        return self.micro_batches[micro_batch]

    def forward(self, index: int, received, input_ids, position_ids, labels, halting):
        model, schedule = self.model, self.schedule
        halting = model.halting_settings(halting)
        run = self._run(index, input_ids, halting.threshold)
        step = schedule.pass_of_chunk(run, index, self.num_passes)
        if step is None:  # a pass this micro-batch did not draw: its payload passes through
            return received.clone()
        num_tokens = run.num_tokens
        if received is None:  # first stage, first pass
            run.token_states = model.embed_tokens(input_ids, position_ids)
            hidden = schedule.pass_inputs(run, step, None)
        else:
            hidden, executing = unpack_payload(received, num_tokens)
            if step > 0 and not model.post_process:  # the last stage decided it itself
                run.halting.receive(executing)
            if model.pre_process:
                previous = hidden[: num_tokens * schedule.rows_per_token(run, step - 1)]
                hidden = schedule.pass_inputs(run, step, previous)
            else:
                hidden = hidden[: num_tokens * schedule.rows_per_token(run, step)]
        outputs = schedule.run_pass(run, step, StageBlock(model.decoder), hidden)
        last_chunk = index == self.num_passes - 1
        if model.post_process and last_chunk:
            schedule.after_pass(run, step, outputs, model.halting_router)
            output = model.language_model_output(schedule.thoughts(run), labels, halting)
            if received is None or labels is None or not torch.is_grad_enabled():
                return output
            return output._replace(loss=KeepInputGradient.apply(output.loss, received))
        originals, twins = [], []
        if model.post_process:  # decide pass step+1 from a twin of this pass's output
            originals.append(outputs)
            twins.append(hand_over(outputs))
            schedule.after_pass(run, step, twins[-1], model.halting_router)
        handed_originals, handed_twins = hand_over_run(run)
        outputs = InjectGrads.apply(outputs, [*twins, *handed_twins], *originals, *handed_originals)
        rows = num_tokens * schedule.rows_per_token(run, self.num_passes)  # the payload's hidden rows
        padding = outputs.new_zeros(rows - outputs.shape[0], *outputs.shape[1:])
        return pack_payload(torch.cat([outputs, padding]), run.halting.executing)


class PassChunk(torch.nn.Module):
    """Virtual pipeline chunk `index` = latent pass `index` of this stage's model (shared
    weights). Has what the schedule asks of a chunk: `config`, `model_type`,
    `set_input_tensor`, and the model's forward signature."""

    def __init__(self, passes: StagePasses, index: int):
        super().__init__()
        self.passes = passes
        self.index = index
        self.config = passes.model.config
        self.model_type = passes.model.model_type
        self.received = None

    def set_input_tensor(self, input_tensor) -> None:
        self.received = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

    def forward(self, input_ids, position_ids, attention_mask=None, labels=None, halting=None):
        return self.passes.forward(self.index, self.received, input_ids, position_ids, labels, halting)


@dataclass
class ScheduleCall:
    """What to hand megatron-core's forward-backward function for one global batch."""

    forward_backward_func: object
    model: object
    data_iterator: object
    seq_length: int


@contextlib.contextmanager
def pipeline_schedule(model_parts: list, data_iterator, seq_length: int, forward_only: bool):
    """The schedule, model chunk list, data iterators and p2p rows for one global batch.

    Latent modes at pipeline size > 1: V pass chunks over this stage's model, one view of the
    data per chunk (each chunk reads every micro-batch), payload rows T' + R, and
    `config.virtual_pipeline_model_parallel_size = V` while the schedule runs. Otherwise the
    model and data as they are, with megatron-core's default schedule.

    model_parts: the modules the schedule runs (one per stage here: the model or its
    data-parallel wrapper; the pass chunks call the bare model underneath).
    """
    lcot_model = get_attr_wrapped_model(model_parts[0], "latent_schedule", return_model_obj=True)
    config = lcot_model.config
    if parallel_state.get_pipeline_model_parallel_world_size() == 1 or config.latent_steps == 0:
        yield ScheduleCall(get_forward_backward_func(), model_parts, data_iterator, seq_length)
        return
    schedule = lcot_model.latent_schedule
    passes = StagePasses(lcot_model, schedule.num_passes(forward_only))
    slots = seq_length * schedule.rows_per_token(None, passes.num_passes)
    previous = config.virtual_pipeline_model_parallel_size, config.finalize_model_grads_func
    config.virtual_pipeline_model_parallel_size = passes.num_passes
    if previous[1] is not None:  # megatron DDP: finalize the wrapped parts, not the pass views
        config.finalize_model_grads_func = lambda _chunks, *rest, **kw: previous[1](model_parts, *rest, **kw)
    try:
        yield ScheduleCall(
            get_forward_backward_func(
                parallel_state.get_pipeline_model_parallel_world_size(), passes.num_passes
            ),
            passes.chunks,
            list(itertools.tee(data_iterator, passes.num_passes)),
            slots + halting_rows(seq_length, config.hidden_size),
        )
    finally:
        config.virtual_pipeline_model_parallel_size, config.finalize_model_grads_func = previous
