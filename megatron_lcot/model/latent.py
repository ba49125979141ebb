"""The latent-thought recurrence: schedules of decoder passes around one TransformerBlock.

Both schedules are spec'd submodules (`LcotSubmodules.latent_schedule`) called as
`schedule(decoder, token_states, rotary, router) -> LatentThoughts`, where `decoder` is the
model's TransformerBlock (its output is final-normed: exactly the state fed back as a thought),
`token_states` [T, b, h] the scaled token embeddings and `rotary` the model's RotaryEmbedding.

* `StepwiseSchedule` (adaptive latent CoT): K+1 exact passes; pass k computes step k of all
  tokens, attending steps 0..k of earlier tokens and itself through the per-layer KV store.
  The halting router gates each step; tokens whose reach falls below the threshold stop
  executing and expose their last executed step's keys/values (KV reuse).
* `InterleavedJacobiSchedule` (PonderLM-2): slots x1 z11..z1K x2 ... under a plain causal mask,
  solved by Jacobi iterations (all tokens' thoughts updated in parallel).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from megatron.core.transformer.module import MegatronModule

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


def decoder_pass(config: LcotConfig, decoder, hidden_states, attention_mask, rotary_pos_emb) -> torch.Tensor:
    """One pass of the decoder block; under `latent_recompute == 'full'` in training, inside
    torch.utils.checkpoint (non-reentrant: the KV store's tensors read from earlier passes keep
    their graph, and a recomputed stepwise pass rewrites its own store entry)."""
    def run():
        return decoder(hidden_states=hidden_states, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb)

    if config.latent_recompute == "full" and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(run, use_reentrant=False)
    return run()


class StepwiseSchedule(MegatronModule):
    """K+1 exact passes of the stepwise layout, with halting and KV reuse.

    Pass k runs only the tokens that execute step k (`run_pass`), so halted tokens cost no
    compute; a pipeline stage can call `run_pass` on its own layers.
    """

    def __init__(self, config: LcotConfig):
        super().__init__(config=config)

    def forward(self, decoder, token_states, rotary, router) -> LatentThoughts:
        num_tokens = token_states.shape[0]
        rotary_table = rotary(num_tokens)  # every pass: token t at position t
        store = StepwiseKVStore()
        states = [self.run_pass(decoder, 0, token_states, None, rotary_table, store)]
        all_tokens = torch.ones(token_states.shape[:2], dtype=torch.bool, device=token_states.device)
        reach, executed = [all_tokens.float()], [all_tokens]  # reach and exit mass in fp32
        for step in range(1, self.config.latent_steps + 1):
            reach.append(reach[-1] * router(states[-1], step - 1))
            executing = executed[-1] & (reach[-1].detach() >= router.threshold())
            if not executing.any():
                break
            executed.append(executing)
            states.append(self.run_pass(decoder, step, states[-1], executing, rotary_table, store))
        return LatentThoughts(states, torch.stack(reach), torch.stack(executed))

    def run_pass(self, decoder, step, inputs, executing, rotary_table, store) -> torch.Tensor:
        """Step `step` of the tokens in `executing` ([T, b] bool, None = all).

        inputs: [T, b, h] the previous step's states (the token states for step 0);
        rotary_table: [T, 1, 1, dim]; store: this forward's StepwiseKVStore.
        Returns [T, b, h]: the step's states; a token that does not execute keeps its input.
        """
        if executing is None or bool(executing.all()):
            mask = StepwisePass(step, inputs.shape[0], store)
            return decoder_pass(self.config, decoder, inputs, mask, rotary_table)
        live = LivePacking(executing)
        mask = StepwisePass(step, inputs.shape[0], store, live)
        packed = decoder_pass(self.config, decoder, live.gather(inputs), mask, live.rotary(rotary_table))
        return live.scatter(packed, inputs)  # [width, b, h] -> [T, b, h]


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

    def num_iterations(self) -> int:
        if not self.training:
            return self.config.jacobi_eval_iters
        draw = random.Random(int(self.jacobi_draws)).choice(self.config.jacobi_iters)
        self.jacobi_draws += 1
        return draw

    def forward(self, decoder, token_states, rotary, router, jacobi_iters=None) -> LatentThoughts:
        num_tokens, batch, hidden = token_states.shape

        def run(slots: torch.Tensor) -> torch.Tensor:
            """slots [T, n, b, h] in interleaved order -> outputs [T, n, b, h]."""
            n = slots.shape[1]
            positions = interleaved_positions(num_tokens, n - 1, slots.device)
            out = decoder_pass(self.config, decoder, slots.reshape(num_tokens * n, batch, hidden), None,
                               rotary_at_positions(rotary, positions))
            return out.view(num_tokens, n, batch, hidden)

        slots = token_states.unsqueeze(1)
        for _ in range(self.config.latent_steps):
            slots = torch.cat([slots, run(slots)[:, -1:]], dim=1)
        iterations = self.num_iterations() if jacobi_iters is None else jacobi_iters
        for _ in range(iterations):
            slots = torch.cat([slots[:, :1], run(slots)[:, :-1]], dim=1)
        outputs = run(slots)
        steps = self.config.latent_steps + 1
        ones = token_states.new_ones(steps, num_tokens, batch, dtype=torch.float32)
        return LatentThoughts(list(outputs.unbind(1)), ones, ones.bool())
