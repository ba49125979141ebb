"""Latent schedules: how many decoder passes a forward makes and what each pass does.

A schedule is a spec'd submodule (`LcotSubmodules.latent_schedule`). Every consumer drives it
through the same hooks, and every pass runs through model/engine.py:

* single-stage training calls the schedule as `schedule(decoder, token_states, rotary, router)
  -> LatentThoughts` (`LatentSchedule.forward`: `run_passes` over a fresh `LatentRun`);
* pipeline stages (parallel/pipeline_passes.py) run pass `pass_of_chunk(run, c, V)` as virtual
  pipeline chunk c (`num_passes` chunks), splitting each pass at the stage boundaries:
  `pass_inputs` on the first stage, `run_pass` on every stage, `after_pass` (the halting
  decision, the step states) and `thoughts` on the last;
* cached decoding (inference/decoding.py) calls `decode(run, decoder, router)`: the same passes
  over the new tokens, appended to a persisting store (training is the prefill of an empty one).

A custom schedule subclasses one of the two below and overrides hooks; it runs unchanged in all
three (tests/unit/test_latent_engine.py).

* `StepwiseSchedule` (adaptive latent CoT): K+1 exact passes; pass k computes step k of the
  tokens that execute it, attending steps 0..k of earlier tokens and itself through the
  per-layer KV store. The halting router gates each step; tokens whose reach falls below the
  threshold stop executing and expose their last executed step's keys/values (KV reuse).
* `InterleavedJacobiSchedule` (PonderLM-2): slots x1 z11..z1K x2 ... under a plain causal mask,
  solved by Jacobi iterations (all tokens' thoughts updated in parallel); decoding computes the
  slots one at a time (the exact sequential semantics that Jacobi training approximates).
"""

from __future__ import annotations

import random

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.module import MegatronModule

from megatron_lcot.model.config import LcotConfig
from megatron_lcot.model.engine import LatentPass, LatentRun, rotary_at, run_block, stream_pass
from megatron_lcot.model.halting import LatentThoughts
from megatron_lcot.model.masking import interleaved_positions


class LatentSchedule(MegatronModule):
    """The hooks every consumer drives (see the module docstring); `run_passes` is the one-process
    loop, `forward` single-stage training and `decode` cached decoding."""

    def __init__(self, config: LcotConfig):
        super().__init__(config=config)

    def forward(self, decoder, token_states, rotary, router, threshold=None, **start) -> LatentThoughts:
        """token_states [T, b, h] scaled embeddings; rotary: the model's RotaryEmbedding;
        threshold: this forward's halting tau (HaltingSettings)."""
        positions = torch.arange(token_states.shape[0], device=token_states.device)
        run = LatentRun.start(token_states, rotary, positions, token_states.shape[1], threshold=threshold)
        self.start(run, **start)
        return self.run_passes(run, decoder, router)

    def run_passes(self, run: LatentRun, block, router) -> LatentThoughts:
        outputs = None
        for index in range(self.passes_of(run)):
            outputs = self.run_pass(run, index, block, self.pass_inputs(run, index, outputs))
            self.after_pass(run, index, outputs, router)
        return self.thoughts(run)

    def decode(self, run: LatentRun, block, router) -> LatentThoughts:
        """New tokens of a cached decoding call (run.store persists between calls)."""
        self.start(run)
        return self.run_passes(run, block, router)

    # hooks ------------------------------------------------------------------------------------
    def start(self, run: LatentRun) -> None:
        """Per forward (micro-batch) set-up, on every stage: the store takes the new tokens."""
        run.store.begin(run.num_tokens, run.valid)

    def num_passes(self, forward_only: bool) -> int:
        """The most passes a forward can make (the pipeline's chunk count)."""
        raise NotImplementedError

    def passes_of(self, run: LatentRun) -> int:
        """The passes this forward makes."""
        return self.num_passes(not self.training)

    def pass_of_chunk(self, run: LatentRun, chunk: int, num_chunks: int) -> int | None:
        """The pass pipeline chunk `chunk` runs for this forward (None: it passes its input on)."""
        return chunk

    def rows_per_token(self, run: LatentRun | None, index: int) -> int:
        """Hidden rows per token of pass `index`'s input and output ([rows T, b, h])."""
        return 1

    def pass_inputs(self, run: LatentRun, index: int, previous: torch.Tensor | None) -> torch.Tensor:
        """Pass `index`'s input from the previous pass's outputs (first stage)."""
        raise NotImplementedError

    def run_pass(self, run: LatentRun, index: int, block, hidden: torch.Tensor) -> torch.Tensor:
        """Pass `index` of `block` (a whole decoder or one stage's layers) on every stage."""
        raise NotImplementedError

    def after_pass(self, run: LatentRun, index: int, outputs: torch.Tensor, router) -> None:
        """The last stage's bookkeeping after pass `index` (step states, halting decision)."""

    def thoughts(self, run: LatentRun) -> LatentThoughts:
        raise NotImplementedError


class StepwiseSchedule(LatentSchedule):
    """K+1 exact passes of the stepwise layout, with halting and KV reuse; pass k writes stream
    k of the store and computes only the tokens that execute step k."""

    def num_passes(self, forward_only: bool) -> int:
        return self.config.latent_steps + 1

    def pass_inputs(self, run, index, previous):
        return run.token_states if index == 0 else previous

    def run_pass(self, run, index, block, hidden):
        return stream_pass(block, run, hidden, stream=index, streams_seen=index + 1)

    def after_pass(self, run, index, outputs, router):
        if run.halting.none_executing():
            return
        run.step_states.append(outputs)
        if index < self.config.latent_steps:
            run.halting.decide(router, outputs, index)

    def thoughts(self, run):
        return run.halting.thoughts(run.step_states)


class InterleavedJacobiSchedule(LatentSchedule):
    """PonderLM-2's interleaved layout solved by Jacobi iterations.

    Warm-up: pass k (k = 1..K) runs the interleaved sequence of steps 0..k-1 only and fills
    step k of every token from step k-1's output, so no slot is ever read before it holds a
    state. Then J Jacobi passes over all T(K+1) slots update every thought from the previous
    pass at once, and a last pass produces the outputs. Gradients flow through every pass.
    J is drawn from `config.jacobi_iters` per training forward (PonderLM-2 uses {2, 3}) with a
    counter kept in the state dict, so the draw is identical on every rank and after a resume;
    `config.jacobi_eval_iters` at evaluation.
    """

    def __init__(self, config: LcotConfig):
        super().__init__(config=config)
        self.register_buffer("jacobi_draws", torch.zeros((), dtype=torch.long))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """`jacobi_draws` as one counter replicated on every rank: every pipeline stage runs the
        schedule and counts the same draws, so the default declaration (one main replica per
        stage, under the same key) is an invalid access pattern at PP > 1. The main replica is
        the first rank of the first stage; every other rank holds a copy."""
        replica_id = (
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_data_parallel_rank(),
        )
        key = f"{prefix}jacobi_draws"
        return {key: ShardedTensor.from_rank_offsets(key, self.jacobi_draws, replica_id=replica_id)}

    def num_iterations(self) -> int:
        if not self.training:
            return self.config.jacobi_eval_iters
        draw = random.Random(int(self.jacobi_draws)).choice(self.config.jacobi_iters)
        self.jacobi_draws += 1
        return draw

    def start(self, run, jacobi_iters=None):
        run.jacobi_iters = self.num_iterations() if jacobi_iters is None else jacobi_iters

    def num_passes(self, forward_only):
        jacobi = self.config.jacobi_eval_iters if forward_only else max(self.config.jacobi_iters)
        return self.config.latent_steps + jacobi + 1

    def passes_of(self, run):
        return self.config.latent_steps + run.jacobi_iters + 1

    def pass_of_chunk(self, run, chunk, num_chunks):
        drawn = self.passes_of(run)
        if chunk == num_chunks - 1:
            return drawn - 1  # the final pass
        return chunk if chunk < drawn - 1 else None

    def rows_per_token(self, run, index):
        return min(index, self.config.latent_steps) + 1

    def pass_inputs(self, run, index, previous):
        if index == 0:
            run.slots = run.token_states.unsqueeze(1)  # [T, 1, b, h]
        else:
            outputs = previous.view(run.num_tokens, -1, *previous.shape[1:])
            update = warm_up_slots if index <= self.config.latent_steps else jacobi_slots
            run.slots = update(run.slots, outputs)
        return run.slots.flatten(0, 1)

    def run_pass(self, run, index, block, hidden):
        return interleaved_pass(block, hidden, run.num_tokens, run.rotary)

    def after_pass(self, run, index, outputs, router):
        run.step_states = [outputs]  # the last pass's outputs are the thoughts

    def thoughts(self, run):
        outputs = run.step_states[-1]
        return interleaved_thoughts(outputs.view(run.num_tokens, -1, *outputs.shape[1:]))

    def decode(self, run, block, router):
        """The K+1 slots of each new token, one length-1 pass each, in order (exact)."""
        store, table = run.store, run.rotary_table()
        tokens = []
        for i in range(run.num_tokens):
            state, slots = run.token_states[i : i + 1], []
            for _ in range(self.config.latent_steps + 1):
                store.begin(1, run.valid[:, i : i + 1])
                state = run_block(block, state, LatentPass(store, 0, 1), table[i : i + 1])
                slots.append(state)
            tokens.append(torch.stack(slots, dim=1))  # [1, K+1, b, h]
        return interleaved_thoughts(torch.cat(tokens))


def interleaved_pass(block, slots: torch.Tensor, num_tokens: int, rotary) -> torch.Tensor:
    """One causal pass over slots [T n, b, h] in interleaved order (n slots per token, every
    slot of token t at position t) -> outputs [T n, b, h]."""
    positions = interleaved_positions(num_tokens, slots.shape[0] // num_tokens - 1, slots.device)
    return run_block(block, slots, None, rotary_at(rotary, positions))


def warm_up_slots(slots: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Warm-up: slots [T, n, b, h] and their outputs -> [T, n+1, b, h], step n filled from step n-1."""
    return torch.cat([slots, outputs[:, -1:]], dim=1)


def jacobi_slots(slots: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Jacobi update: every thought k >= 1 becomes step k-1's output; step 0 stays the token."""
    return torch.cat([slots[:, :1], outputs[:, :-1]], dim=1)


def interleaved_thoughts(outputs: torch.Tensor) -> LatentThoughts:
    """The final pass's outputs [T, K+1, b, h] as LatentThoughts (every step executed)."""
    num_tokens, steps, batch, _ = outputs.shape
    ones = outputs.new_ones(steps, num_tokens, batch, dtype=torch.float32)  # reach in fp32
    return LatentThoughts(list(outputs.unbind(1)), ones, ones.bool())
