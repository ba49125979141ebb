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
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model

from megatron_lcot.model.latent import (
    LatentThoughts,
    continue_reach,
    halting_decision,
    interleaved_pass,
    interleaved_thoughts,
    jacobi_slots,
    stepwise_pass,
    warm_up_slots,
)
from megatron_lcot.model.masking import StepwiseKVStore


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


@dataclass
class MicroBatchPasses:
    """What one micro-batch's later passes read on this stage.

    store: this stage's layers' keys/values per pass (entries of finished passes detached).
    executed: [T, b] bool per pass run so far (pass 0: every token).
    step_states: last stage, detached outputs y_k of passes k < current (for the loss chunk).
    reach: last stage, no-grad r(t, k) for the next decision.
    slots: first stage, interleaved layout: detached slots [T, n, b, h] of the previous pass.
    jacobi: interleaved layout: the Jacobi iterations this micro-batch drew.
    """

    store: StepwiseKVStore = field(default_factory=StepwiseKVStore)
    executed: list = field(default_factory=list)
    step_states: list = field(default_factory=list)
    reach: list = field(default_factory=list)
    slots: torch.Tensor | None = None
    jacobi: int = 0


class StageBlock:
    """This stage's TransformerBlock as a function of the hidden states it is called with.

    megatron-core's block on a non-first stage ignores its `hidden_states` argument and reads
    `input_tensor`; setting that to whatever a pass runs (all rows, or only the live tokens'
    packed rows) keeps the shared per-pass functions of latent.py valid on every stage.
    """

    def __init__(self, decoder):
        self.decoder = decoder
        self.config = decoder.config

    def __call__(self, hidden_states, **kwargs):
        self.decoder.set_input_tensor(hidden_states)
        return self.decoder(hidden_states=hidden_states, **kwargs)


def _hand_over_pass(store: StepwiseKVStore, step: int) -> tuple:
    """Replace pass `step`'s keys/values in every layer by detached twins: (originals, twins)."""
    originals, twins = [], []
    for per_layer in (*store.keys.values(), *store.values.values()):
        originals.append(per_layer[step])
        per_layer[step] = hand_over(per_layer[step])
        twins.append(per_layer[step])
    return originals, twins


class StagePasses:
    """One schedule call's latent passes on this stage: V chunks over one LcotGPTModel.

    The schedule runs each chunk's micro-batches in order, so chunk k's n-th forward is
    micro-batch n; its state is dropped after the last chunk's forward (the autograd graph and
    `InjectGrads` keep what backward needs).
    """

    def __init__(self, model, num_passes: int):
        self.model = model
        self.config = model.config
        self.num_passes = num_passes
        self.forwards = [0] * num_passes
        self.micro_batches: dict = {}
        self.chunks = [PassChunk(self, index) for index in range(num_passes)]

    def _state(self, index: int) -> MicroBatchPasses:
        micro_batch = self.forwards[index]
        self.forwards[index] += 1
        if index == self.num_passes - 1:
            return self.micro_batches.pop(micro_batch, None) or MicroBatchPasses()
        return self.micro_batches.setdefault(micro_batch, MicroBatchPasses())

    def forward(self, index: int, received, input_ids, position_ids, labels):
        state = self._state(index)
        if self.config.latent_layout == "interleaved":
            return self._interleaved(index, state, received, input_ids, position_ids, labels)
        return self._stepwise(index, state, received, input_ids, position_ids, labels)

    def _stage_inputs(self, index: int, received, input_ids, position_ids) -> tuple:
        """(hidden [T', b, h], executing [T, b] bool) this chunk starts from."""
        if received is None:  # first stage, first pass
            tokens = self.model.embed_tokens(input_ids, position_ids)
            return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return unpack_payload(received, input_ids.shape[1])

    def _stepwise(self, index, state, received, input_ids, position_ids, labels):
        model = self.model
        inputs, executing = self._stage_inputs(index, received, input_ids, position_ids)
        state.executed.append(executing)
        # Once no token executes (one process stops its loop there), a pass computes nothing:
        # every token keeps its state, and no later pass reads this pass's keys/values.
        idle = index > 0 and not bool(executing.any())
        if idle:
            outputs = inputs.view_as(inputs)
        else:
            outputs = stepwise_pass(StageBlock(model.decoder), inputs, index, state.store,
                                    executing if index > 0 else None, model.rotary_pos_emb(input_ids.shape[1]))
        last_pass = index == self.num_passes - 1
        if model.post_process and last_pass:
            return model.language_model_output(self._thoughts(state, outputs), labels)
        originals, twins = _hand_over_pass(state.store, index) if not (last_pass or idle) else ([], [])
        if model.post_process:  # decide pass index+1 from this pass's output
            if not state.reach:
                state.reach.append(torch.ones_like(executing, dtype=torch.float32))  # reach in fp32
            with torch.no_grad():
                state.reach.append(continue_reach(model.halting_router, state.reach[-1], outputs, index))
            executing = halting_decision(executing, state.reach[-1], model.halting_router.threshold())
            state.step_states.append(hand_over(outputs))
            originals.append(outputs)
            twins.append(state.step_states[-1])
        return pack_payload(InjectGrads.apply(outputs, twins, *originals), executing)

    def _thoughts(self, state: MicroBatchPasses, last_output: torch.Tensor) -> LatentThoughts:
        """The step states, reach (with gradient, into the router) and executed steps of every
        pass, as StepwiseSchedule returns them in one process."""
        states = [*state.step_states, last_output]
        reach = [torch.ones_like(state.executed[0], dtype=torch.float32)]
        for step, step_state in enumerate(states[:-1]):
            reach.append(continue_reach(self.model.halting_router, reach[-1], step_state, step))
        return LatentThoughts(states, torch.stack(reach), torch.stack(state.executed))

    def _interleaved(self, index, state, received, input_ids, position_ids, labels):
        """Pass `index` of the interleaved layout: K warm-up passes (n = index + 1 slots per
        token), then J Jacobi passes and the final pass over all K+1 slots. The first stage
        rebuilds each pass's slots from the previous pass's slots and the received outputs; a
        micro-batch that drew J below the chunks' maximum passes its payload through the
        chunks of the Jacobi passes it did not draw, on every stage."""
        model, latent_steps = self.model, self.config.latent_steps
        num_tokens, batch = input_ids.shape[1], input_ids.shape[0]
        if index == 0:  # every stage draws J once per micro-batch, in the same order
            state.jacobi = model.latent_schedule.num_iterations()
        final = index == self.num_passes - 1
        if latent_steps + state.jacobi <= index and not final:
            return received.clone()
        previous = latent_steps + state.jacobi - 1 if final else index - 1
        slots_per_token = min(index, latent_steps) + 1
        if model.pre_process:
            if index == 0:
                slots = model.embed_tokens(input_ids, position_ids).unsqueeze(1)  # [T, 1, b, h]
            else:
                rows = num_tokens * (min(previous, latent_steps) + 1)
                outputs = unpack_payload(received, num_tokens)[0][:rows].view(num_tokens, -1, batch, self.config.hidden_size)
                update = warm_up_slots if previous < latent_steps else jacobi_slots
                slots = update(state.slots, outputs)
            hidden = slots.flatten(0, 1)
        else:
            hidden = unpack_payload(received, num_tokens)[0][: num_tokens * slots_per_token]
        outputs = interleaved_pass(StageBlock(model.decoder), hidden, num_tokens, model.rotary_pos_emb)
        if final and model.post_process:
            steps = outputs.view(num_tokens, latent_steps + 1, batch, -1)
            return model.language_model_output(interleaved_thoughts(steps), labels)
        originals, twins = [], []
        if model.pre_process and not final:
            state.slots = hand_over(slots)
            originals, twins = [slots], [state.slots]
        outputs = InjectGrads.apply(outputs, twins, *originals)
        padding = outputs.new_zeros(num_tokens * (latent_steps + 1) - outputs.shape[0], *outputs.shape[1:])
        everyone = torch.ones(num_tokens, batch, dtype=torch.bool, device=outputs.device)
        return pack_payload(torch.cat([outputs, padding]), everyone)


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

    def forward(self, input_ids, position_ids, attention_mask=None, labels=None):
        return self.passes.forward(self.index, self.received, input_ids, position_ids, labels)


def num_passes(config, forward_only: bool) -> int:
    """V: decoder passes per micro-batch (chunks of the virtual pipeline)."""
    if config.latent_layout == "stepwise":
        return config.latent_steps + 1
    jacobi = config.jacobi_eval_iters if forward_only else max(config.jacobi_iters)
    return config.latent_steps + jacobi + 1


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
    passes = StagePasses(lcot_model, num_passes(config, forward_only))
    slots = seq_length * (config.latent_steps + 1) if config.latent_layout == "interleaved" else seq_length
    previous = config.virtual_pipeline_model_parallel_size, config.finalize_model_grads_func
    config.virtual_pipeline_model_parallel_size = passes.num_passes
    if previous[1] is not None:  # megatron DDP: finalize the wrapped parts, not the pass views
        config.finalize_model_grads_func = lambda _chunks, *rest, **kw: previous[1](model_parts, *rest, **kw)
    try:
        yield ScheduleCall(
            get_forward_backward_func(parallel_state.get_pipeline_model_parallel_world_size(), passes.num_passes),
            passes.chunks,
            list(itertools.tee(data_iterator, passes.num_passes)),
            slots + halting_rows(seq_length, config.hidden_size),
        )
    finally:
        config.virtual_pipeline_model_parallel_size, config.finalize_model_grads_func = previous
