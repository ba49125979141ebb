"""The latent-thought recurrence: schedules of decoder passes around one TransformerBlock.

Both schedules are spec'd submodules (`LcotSubmodules.latent_schedule`) called as
`schedule(decoder, token_states, rotary, router) -> LatentThoughts`, where `decoder` is the
model's TransformerBlock (its output is final-normed: exactly the state fed back as a thought),
`token_states` [T, b, h] the scaled token embeddings and `rotary` the model's RotaryEmbedding.

* `StepwiseSchedule` (adaptive latent CoT): K+1 exact passes; pass k computes step k of the
  tokens that execute it, attending steps 0..k of earlier tokens and itself through the
  per-layer KV store.
  The halting router gates each step; tokens whose reach falls below the threshold stop
  executing and expose their last executed step's keys/values (KV reuse).
* `InterleavedJacobiSchedule` (PonderLM-2): slots x1 z11..z1K x2 ... under a plain causal mask,
  solved by Jacobi iterations (all tokens' thoughts updated in parallel).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer.module import MegatronModule

from megatron_lcot import parallel
from megatron_lcot.model.config import LcotConfig
from megatron_lcot.model.halting import exit_mass
from megatron_lcot.model.masking import LivePacking, StepwiseKVStore, StepwisePass, interleaved_positions
from megatron_lcot.model.rotary import rotary_at_positions


@dataclass
class LatentThoughts:
    """What a schedule computed for each token's steps.

    step_states: n tensors [s, b, h], final-normed output of step k for every token (n <= K+1:
        a schedule may stop early once no token executes a step).
    reach: [g+1, s, b] r(t,k) for k = 0..g, g = number of gates evaluated (r(t,0) = 1).
    executed: [n, s, b] bool, whether step k of token t was executed.
    """

    step_states: list
    reach: torch.Tensor
    executed: torch.Tensor

    @property
    def exit_mass(self) -> torch.Tensor:
        """[n, s, b] weight of each step in the token's output (halting.exit_mass)."""
        return exit_mass(self.reach[: len(self.step_states)], self.executed)

    def output_states(self) -> torch.Tensor:
        """[s, b, h] the exit-mass mixture of step states (the last step when nothing halts)."""
        weights = self.exit_mass.unsqueeze(-1)  # fp32: the mixture is summed in fp32 under bf16
        return (weights * torch.stack(self.step_states).float()).sum(0).to(self.step_states[0].dtype)

    def latent_steps(self) -> torch.Tensor:
        """[s, b] executed latent steps (k >= 1) per token."""
        return self.executed[1:].sum(0).float()

    def expected_latent_steps(self) -> torch.Tensor:
        """[s, b] soft ponder cost: reach summed over executed latent steps."""
        n = len(self.step_states)
        return (self.reach[1:n] * self.executed[1:]).sum(0).float()


def decoder_pass(decoder, hidden_states, attention_mask, rotary_pos_emb) -> torch.Tensor:
    """One pass of `decoder` (a TransformerBlock); under `latent_recompute == 'full'` with grad
    enabled, inside torch.utils.checkpoint (non-reentrant: tensors read from earlier passes' KV
    store keep their graph, and a recomputed stepwise pass rewrites its own store entry)."""

    def run():
        return decoder(hidden_states=hidden_states, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb)

    if getattr(decoder.config, "latent_recompute", None) == "full" and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(run, use_reentrant=False)
    return run()


def stepwise_pass(decoder, inputs, step: int, store: StepwiseKVStore, executing, rotary_pos_emb):
    """Pass `step` of the stepwise layout through `decoder` (a whole model's or one pipeline
    stage's TransformerBlock): inputs [T, b, h] -> outputs [T, b, h]; rotary_pos_emb: the
    table [T, 1, 1, dim]. The layers write what this step exposes into `store`.

    Only the tokens in `executing` ([T, b] bool, None = all) are computed: they are packed to
    the front of each sequence (LivePacking), the pass runs on those rows with RoPE at their
    positions, and its outputs (and, in each layer, its keys/values) are scattered back onto
    the previous step's: a token that does not execute keeps its input as its state and
    exposes its last executed step's keys/values (KV reuse). Halted tokens cost nothing.
    """
    if executing is None or bool(executing.all()):
        mask = StepwisePass(step, inputs.shape[0], store)
        return decoder_pass(decoder, inputs, mask, rotary_pos_emb)
    live = LivePacking(executing)
    mask = StepwisePass(step, inputs.shape[0], store, live)
    packed = decoder_pass(decoder, live.gather(inputs), mask, live.rotary(rotary_pos_emb))  # [width, b, h]
    return live.scatter(packed, inputs)


def continue_reach(router, reach: torch.Tensor, step_state: torch.Tensor, step: int) -> torch.Tensor:
    """r(t, step+1) = r(t, step) * g(t, step): [s, b]."""
    return reach * router(step_state, step)


def halting_decision(executed: torch.Tensor, reach: torch.Tensor, threshold: float) -> torch.Tensor:
    """[s, b] bool: the tokens that execute the next step (monotone; reach below tau prunes).

    The hard threshold turns any drift between tensor-parallel ranks of the replicated router
    into different executed steps (different KV per head shard, mismatched collectives), so a
    token executes only where every tensor-parallel rank says so (a MIN all-reduce): the
    decision is identical by construction.
    """
    executing = executed & (reach.detach() >= threshold)
    if not parallel_state.model_parallel_is_initialized():
        return executing
    agreed = executing.to(torch.uint8)
    parallel.all_reduce(agreed, parallel_state.get_tensor_model_parallel_group(), op=dist.ReduceOp.MIN)
    return agreed.bool()


class StepwiseSchedule(MegatronModule):
    """K+1 exact passes of the stepwise layout, with halting and KV reuse; pass k computes only
    the tokens that execute step k (`stepwise_pass`)."""

    def __init__(self, config: LcotConfig):
        super().__init__(config=config)

    def forward(self, decoder, token_states, rotary, router) -> LatentThoughts:
        rotary_pos_emb = rotary(token_states.shape[0])  # every pass: token t at position t
        store = StepwiseKVStore()
        states = [stepwise_pass(decoder, token_states, 0, store, None, rotary_pos_emb)]
        all_tokens = torch.ones(token_states.shape[:2], dtype=torch.bool, device=token_states.device)
        reach, executed = [all_tokens.float()], [all_tokens]  # reach and exit mass in fp32
        for step in range(1, self.config.latent_steps + 1):
            reach.append(continue_reach(router, reach[-1], states[-1], step - 1))
            executing = halting_decision(executed[-1], reach[-1], router.threshold())
            if not executing.any():
                break
            executed.append(executing)
            states.append(stepwise_pass(decoder, states[-1], step, store, executing, rotary_pos_emb))
        return LatentThoughts(states, torch.stack(reach), torch.stack(executed))


class InterleavedJacobiSchedule(MegatronModule):
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
        replica_id = (parallel_state.get_pipeline_model_parallel_rank(),
                      parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_data_parallel_rank())
        key = f"{prefix}jacobi_draws"
        return {key: ShardedTensor.from_rank_offsets(key, self.jacobi_draws, replica_id=replica_id)}

    def num_iterations(self) -> int:
        if not self.training:
            return self.config.jacobi_eval_iters
        draw = random.Random(int(self.jacobi_draws)).choice(self.config.jacobi_iters)
        self.jacobi_draws += 1
        return draw

    def forward(self, decoder, token_states, rotary, router, jacobi_iters=None) -> LatentThoughts:
        def run(slots: torch.Tensor) -> torch.Tensor:
            flat = slots.flatten(0, 1)  # [T n, b, h]
            return interleaved_pass(decoder, flat, slots.shape[0], rotary).view(slots.shape)

        slots = token_states.unsqueeze(1)
        for _ in range(self.config.latent_steps):
            slots = warm_up_slots(slots, run(slots))
        iterations = self.num_iterations() if jacobi_iters is None else jacobi_iters
        for _ in range(iterations):
            slots = jacobi_slots(slots, run(slots))
        return interleaved_thoughts(run(slots))


def interleaved_pass(decoder, slots: torch.Tensor, num_tokens: int, rotary) -> torch.Tensor:
    """One causal pass over slots [T n, b, h] in interleaved order (n slots per token, every
    slot of token t at position t) -> outputs [T n, b, h]. Shared by the one-stage schedule and
    the pipeline stages (pipeline_passes.py)."""
    positions = interleaved_positions(num_tokens, slots.shape[0] // num_tokens - 1, slots.device)
    return decoder_pass(decoder, slots, None, rotary_at_positions(rotary, positions))


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
