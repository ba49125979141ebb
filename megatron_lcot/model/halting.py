"""Halting: routers that decide, per token and latent step, whether to keep thinking.

A router is a spec'd submodule (`LcotSubmodules.halting_router`), a `HaltingRouter` with one
method: `router(step_state [s, b, h], step k) -> continue_prob [s, b]` (fp32), the probability
g(t, k) that token t runs step k+1 given the final-normed output of its step k. Swapping the
spec swaps the rule. What follows from the gates is written once here, for every schedule and consumer
(model/engine.py): `HaltingState` (reach, executed steps, the decision and its tensor-parallel
agreement, the live tokens of the next pass), `LatentThoughts` (the exit-mass mixture) and
`LivePacking` (the live tokens packed across the micro-batch) (docs/method.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule

from megatron_lcot import parallel
from megatron_lcot.model.config import LcotConfig
from megatron_lcot.model.vocab_parallel import head_statistic, vocab_parallel_entropy


class HaltingRouter(MegatronModule):
    """Base of every router. The halting recipe's iteration-dependent settings (warm-up, penalty
    sample) are not the router's: the model's forward takes them (halting_schedule.py)."""

    def bind_output_layer(self, output_layer: torch.nn.Module) -> None:
        """Called once by the model with its LM head. Routers that read the step's own
        prediction keep it (EntropyHaltingRouter); the others need nothing."""


class LinearHaltingRouter(HaltingRouter):
    """One linear gate per latent step: g(t,k) = sigmoid(w_k . y(t,k) + b_k).

    weight [K, h] starts at zero and bias [K] at logit(halting_init_continue_prob), so at
    initialisation every token continues with the same probability (0.9 by default: most tokens
    think) and the router learns from the exit-mass mixture which tokens may stop. The router is
    tiny and reads the full hidden state, so it is replicated on every tensor-parallel rank.
    Its weights are created fp32 whatever `params_dtype` is, and its arithmetic is fp32 even if
    a wrapper casts the module (DeepSpeed bf16): in bf16 a gate logit near 2.2 has a resolution
    of 2^-6, and hard pruning decisions (reach >= tau) would flip on rounding. Returns fp32 gates.
    """

    def __init__(self, config: LcotConfig):
        super().__init__(config=config)
        p = config.halting_init_continue_prob
        self.weight = torch.nn.Parameter(
            torch.zeros(config.latent_steps, config.hidden_size, dtype=torch.float32)
        )
        self.bias = torch.nn.Parameter(
            torch.full((config.latent_steps,), math.log(p / (1 - p)), dtype=torch.float32)
        )

    def forward(self, step_state: torch.Tensor, step: int) -> torch.Tensor:
        return torch.sigmoid(step_state.float() @ self.weight[step].float() + self.bias[step].float())


class EntropyHaltingRouter(LinearHaltingRouter):
    """The linear gate plus the entropy of the step's own prediction:
    g(t,k) = sigmoid(w_k . y(t,k) + a_k H(t,k) / log V + b_k).

    H is the entropy of softmax(head(y(t,k))) over the (padded) vocabulary V, under
    stop-gradient (vocab_parallel.py): an uncertain prediction is the difficulty signal
    the linear gate can only approximate from the state. a [K] starts at zero, so at
    initialisation this is the linear router. The head is the model's own (`bind_output_layer`),
    held outside this module's tree so its weights are saved and trained once; its
    forward-only cost, one LM head per gated token, is counted by model/flops.py.
    """

    def __init__(self, config: LcotConfig):
        super().__init__(config)
        self.entropy_weight = torch.nn.Parameter(torch.zeros(config.latent_steps, dtype=torch.float32))
        self._output_layer = ()

    def bind_output_layer(self, output_layer: torch.nn.Module) -> None:
        self._output_layer = (output_layer,)  # a tuple: not registered as a submodule

    def forward(self, step_state: torch.Tensor, step: int) -> torch.Tensor:
        if not self._output_layer:
            raise RuntimeError("EntropyHaltingRouter needs the model's LM head: call bind_output_layer first")
        head = self._output_layer[0]
        with torch.no_grad():
            entropy = head_statistic(head, step_state.flatten(0, -2), vocab_parallel_entropy)
            vocab = head.output_size_per_partition * parallel_state.get_tensor_model_parallel_world_size()
            uncertainty = entropy.view(step_state.shape[:-1]) / math.log(vocab)  # [...] in [0, 1]
        logit = step_state.float() @ self.weight[step].float() + self.bias[step].float()
        return torch.sigmoid(logit + self.entropy_weight[step].float() * uncertainty)


class NoHalting(HaltingRouter):
    """Fixed-K latent thoughts: every token always continues (g = 1)."""

    def forward(self, step_state: torch.Tensor, step: int) -> torch.Tensor:
        return step_state.new_ones(step_state.shape[:-1], dtype=torch.float32)


def is_router_param(name: str, param: torch.nn.Parameter) -> bool:
    """Whether a named parameter belongs to a halting router (its own optimizer group: learning
    rate x `--halting-router-lr-mult`, no weight decay). Works through wrapper prefixes
    (`module.`)."""
    return "halting_router" in name.split(".")


def exit_mass(reach: torch.Tensor, executed: torch.Tensor) -> torch.Tensor:
    """Share of each token's output taken from each executed step, pruned mass moved back.

    reach:    [n, s, b] r(t,k) for the n computed steps (r(t,0) = 1, non-increasing in k).
    executed: [n, s, b] bool, step k of token t was executed (monotone in k).
    Returns [n, s, b]: e(t,k) = r(t,k) - r(t,k+1) while step k+1 runs; at a token's last
    executed step, the whole remaining reach r(t,k) (its own exit mass plus that of every
    pruned later step); 0 for steps not executed. Sums to 1 over k.
    """
    runs_next = torch.cat([executed[1:], torch.zeros_like(executed[:1])])
    next_reach = torch.cat([reach[1:], torch.zeros_like(reach[:1])])
    last = torch.where(executed, reach, torch.zeros_like(reach))
    return torch.where(runs_next, reach - next_reach, last)


@dataclass
class LatentThoughts:
    """What a schedule computed for each token's steps.

    step_states: n tensors [s, b, h], final-normed output of step k for every token (n <= K+1:
        a schedule may stop early once no token executes a step).
    reach: [g+1, s, b] r(t,k) for k = 0..g, g = number of gates evaluated (r(t,0) = 1).
    executed: [n, s, b] bool, whether step k of token t was executed.
    packings: n entries, the LivePacking step k ran with (None: every token executed it).
    """

    step_states: list
    reach: torch.Tensor
    executed: torch.Tensor
    packings: list | None = None

    @property
    def exit_mass(self) -> torch.Tensor:
        """[n, s, b] weight of each step in the token's output (exit_mass)."""
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

    def packing(self, step: int):
        """The LivePacking step `step` ran with, None when every token executed it."""
        return None if self.packings is None else self.packings[step]


class LivePacking:
    """The tokens that execute one pass, packed across the whole micro-batch.

    executing: [n, b] bool; live = N (its count) and widest (the most live tokens of any
    sequence) are host integers read in the pass's one synchronisation (HaltingState).
    Packed row r is token `token[r]` of sequence `seq[r]` (sequence-major, tokens in order); the
    block runs on [N, 1, h]. For attention, `queries` lays the packed rows out per sequence as
    [widest, b] (padding rows repeat packed row 0; they attend token 0 and are dropped by
    `context`).
    """

    def __init__(self, executing: torch.Tensor, live: int, widest: int):
        num_tokens, batch = executing.shape
        order = torch.argsort((~executing).t().reshape(-1).to(torch.uint8), stable=True)[:live]
        self.seq, self.token = order // num_tokens, order % num_tokens  # [N]
        self.rows = self.token * batch + self.seq  # [N] rows of the flattened [n * b]
        counts = executing.sum(0)  # [b]
        starts = counts.cumsum(0) - counts
        # [N] each packed row's place in its sequence
        self.column = torch.arange(live, device=executing.device) - starts[self.seq]
        place = torch.arange(widest, device=executing.device)
        self.query_valid = place[None, :] < counts[:, None]  # [b, widest]
        self.query_rows = torch.where(self.query_valid, starts[:, None] + place, 0)  # [b, widest]
        self.query_tokens = torch.where(self.query_valid, self.token[self.query_rows], 0)  # [b, widest]

    def gather(self, full: torch.Tensor) -> torch.Tensor:
        """[n, b, ...] -> [N, 1, ...] the live tokens' rows."""
        return full.flatten(0, 1)[self.rows].unsqueeze(1)

    def scatter(self, packed: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """packed [N, 1, ...] onto base [n, b, ...]: live rows from packed, the others from base."""
        return base.flatten(0, 1).index_copy(0, self.rows, packed.squeeze(1)).view_as(base)

    def queries(self, query: torch.Tensor) -> torch.Tensor:
        """[N, 1, heads, hn] -> [widest, b, heads, hn], each sequence's live queries in a column."""
        return query[:, 0][self.query_rows.t()]

    def context(self, context: torch.Tensor) -> torch.Tensor:
        """[widest, b, ...] -> [N, 1, ...] back in packed order."""
        return context[self.column, self.seq].unsqueeze(1)


class HaltingState:
    """Reach, executed steps and the next pass's live tokens of one forward (one micro-batch).

    shape: (n, b) tokens; valid: [n, b] bool real tokens (decoding's padding; None: all): a
    padded token never executes a latent step; threshold: this forward's tau (the training
    iteration's, halting_schedule.py; None: `halting_threshold`). Pass 0 runs every token.
    After pass k the last pipeline stage (or the one process) calls `decide`; other stages
    `receive` the decision.
    Each decision costs one host synchronisation (the live counts that size the next pass) and
    one collective (the tensor-parallel agreement).
    """

    def __init__(self, shape: tuple, device, valid: torch.Tensor | None = None, threshold=None):
        self.threshold = threshold  # tau of this forward (HaltingSettings); None: the configured one
        everyone = torch.ones(shape, dtype=torch.bool, device=device)
        self.reach = [everyone.float()]  # reach and exit mass in fp32
        self.executed = [everyone]
        self.packings = [None]
        self.valid = valid
        self.executing = everyone
        self.counts = (shape[0] * shape[1], shape[0])  # (live tokens, most live in a sequence)

    def decide(self, router, step_state: torch.Tensor, step: int) -> None:
        """Gate after `step` on step_state [n, b, h]: r(t, step+1) = r(t, step) g(t, step);
        a token executes step+1 while it executed `step` and its reach is >= tau.

        The hard threshold turns any drift between tensor-parallel ranks of the replicated router
        into different executed steps (different KV per head shard, mismatched collectives), so a
        token executes only where every tensor-parallel rank says so (a MIN all-reduce)."""
        self.reach.append(self.reach[-1] * router(step_state, step))
        threshold = router.config.halting_threshold if self.threshold is None else self.threshold
        executing = self.executed[-1] & (self.reach[-1].detach() >= threshold)
        if self.valid is not None:
            executing = executing & self.valid
        if parallel_state.model_parallel_is_initialized():
            agreed = executing.to(torch.uint8)
            group = parallel_state.get_tensor_model_parallel_group()
            parallel.all_reduce(agreed, group, op=dist.ReduceOp.MIN)
            executing = agreed.bool()
        self.receive(executing)

    def receive(self, executing: torch.Tensor) -> None:
        """Take the decision executing [n, b] bool for the next pass (read on the host once)."""
        live, widest = torch.stack([executing.sum(), executing.sum(0).max()]).tolist()
        self.executing, self.counts = executing, (live, widest)
        if live:
            self.executed.append(executing)
            self.packings.append(None if self.all_executing() else LivePacking(executing, live, widest))

    def none_executing(self) -> bool:
        return self.counts[0] == 0

    def all_executing(self) -> bool:
        return self.counts[0] == self.executing.numel()

    def packing(self) -> LivePacking:
        """The live tokens of the pass about to run, packed."""
        return self.packings[-1]

    def thoughts(self, step_states: list) -> LatentThoughts:
        return LatentThoughts(step_states, torch.stack(self.reach), torch.stack(self.executed), self.packings)
