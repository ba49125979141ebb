"""Attention masks and position ids of the two latent layouts (METHOD.md section 2).

Slot (t, k) is token t at latent step k (k = 0: the token itself). Masks here are boolean with
True = may attend (SDPA's convention; megatron's is the opposite and is converted in attention.py).

* Dense references over all T(K+1) slots, obviously correct, used by tests and docs:
  `interleaved_dense_mask` (token-major slot order x1 z11..z1K x2 ...: plain causal) and
  `stepwise_dense_mask` (step-major order: (t,k) sees (t',k') iff t' <= t and k' <= k).
* The structured form the model runs: `StepwisePass`, one per stepwise pass k, whose mask is
  `stepwise_pass_mask(T, k)` (rows of the dense mask for step k, columns of steps 0..k) and
  which carries the per-layer KV store those columns are read from, and `LivePacking`, the
  tokens that execute a step packed to the front of each sequence (a pass computes only them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_lcot.model.attention_pass import AttentionPass


def interleaved_positions(num_tokens: int, latent_steps: int, device=None) -> torch.Tensor:
    """RoPE position of each slot in interleaved order: every slot of token t sits at t. [T(K+1)]"""
    return torch.arange(num_tokens, device=device).repeat_interleave(latent_steps + 1)


def interleaved_dense_mask(num_tokens: int, latent_steps: int) -> torch.Tensor:
    """[T(K+1), T(K+1)] causal mask over the interleaved slot order."""
    n = num_tokens * (latent_steps + 1)
    return torch.ones(n, n, dtype=torch.bool).tril()


def stepwise_dense_mask(num_tokens: int, latent_steps: int) -> torch.Tensor:
    """[T(K+1), T(K+1)] stepwise mask over step-major slot order (index k*T + t)."""
    n = num_tokens * (latent_steps + 1)
    token = torch.arange(n) % num_tokens
    step = torch.arange(n) // num_tokens
    return (token[None, :] <= token[:, None]) & (step[None, :] <= step[:, None])


def stepwise_pass_mask(num_tokens: int, step: int, device=None) -> torch.Tensor:
    """[T, (step+1) T] mask of pass `step`: causal over tokens, repeated for steps 0..step."""
    causal = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=device).tril()
    return causal.repeat(1, step + 1)


@dataclass
class StepwiseKVStore:
    """Per-layer keys/values that each executed pass exposes, for one forward of the model.

    keys[layer_number][k]: [T, b, ng, hn], already rotary-embedded. Lives for one forward;
    autograd keeps what backward needs.
    """

    keys: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)


class LivePacking:
    """The tokens that execute one latent step, packed to the front of each sequence.

    Halted tokens cost nothing in a pass: the pass runs on `width` packed rows per sequence
    (width = the most live tokens of any sequence in the micro-batch), and its outputs and
    keys/values are scattered back onto the previous step's (which is exactly what a halted
    token shows: its state stays, its keys/values are reused).

    executing: [T, b] bool, monotone in the step (a live token was live at the step before).
    positions: [width, b] token index of each packed row (padding rows repeat token 0: they
        compute a harmless row that is never scattered back).
    valid: [width, b] bool, False on padding rows.
    """

    def __init__(self, executing: torch.Tensor):
        num_tokens = executing.shape[0]
        token = torch.arange(num_tokens, device=executing.device)[:, None]
        # live tokens first, in token order; halted ones after them (key >= T)
        order = torch.where(executing, token, token + num_tokens).sort(dim=0).values
        self.width = int(executing.sum(0).max())
        self.num_tokens = num_tokens
        self.executing = executing
        self.valid = order[: self.width] < num_tokens
        self.positions = torch.where(self.valid, order[: self.width], 0)
        self._scatter_rows = torch.where(self.valid, self.positions, num_tokens)

    def gather(self, full: torch.Tensor) -> torch.Tensor:
        """[T, b, ...] -> [width, b, ...] rows of the live tokens."""
        index = self.positions.view(*self.positions.shape, *([1] * (full.dim() - 2)))
        return full.gather(0, index.expand(self.width, *full.shape[1:]))

    def scatter(self, packed: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """packed [width, b, ...] onto base [T, b, ...]: live rows from packed, others from base."""
        index = self._scatter_rows.view(*self._scatter_rows.shape, *([1] * (base.dim() - 2)))
        padded = torch.cat([base, base[:1]])  # row T absorbs the padding rows
        return padded.scatter(0, index.expand(self.width, *base.shape[1:]), packed)[: self.num_tokens]

    def rotary(self, table: torch.Tensor) -> torch.Tensor:
        """RoPE of the packed rows: table [T, 1, 1, dim] -> [width, b, 1, dim]."""
        return table[:, 0][self.positions]


@dataclass
class StepwisePass:
    """The `attention_mask` of stepwise pass `step` (the structured mask attention.py reads).

    live: which tokens execute this step, packed (LivePacking); the pass's queries are then
    its `width` packed rows, and a token that does not execute exposes, in every layer, the
    keys/values of its previous step, i.e. of its last executed step (KV reuse). None means
    every token executes and the queries are all T tokens in order.

    Structured-mask protocol (attention.py): `expose`, `allowed_keys`, and the optional
    `is_causal(device)` (True: the allowed keys are a plain causal mask over the exposed ones,
    so no mask need be materialised) and `mask_mod` (FlexAttention's form of allowed_keys).
    """

    step: int
    num_tokens: int
    store: StepwiseKVStore
    live: LivePacking | None = None
    _allowed: torch.Tensor | None = field(default=None, repr=False)

    def expose(self, layer_number: int, key: torch.Tensor, value: torch.Tensor):
        """Record what this step exposes in `layer_number`; return keys/values of steps 0..step.

        key/value: [T or width, b, ng, hn] -> [(step+1) T, b, ng, hn]. Writing at index
        `step` (not appending) makes a re-run of the same pass (recompute) overwrite its entry.
        """
        keys = self.store.keys.setdefault(layer_number, [])
        values = self.store.values.setdefault(layer_number, [])
        del keys[self.step :], values[self.step :]
        if self.live is not None:
            key = self.live.scatter(key, keys[-1])
            value = self.live.scatter(value, values[-1])
        keys.append(key)
        values.append(value)
        if self.step == 0:
            return key, value
        return torch.cat(keys, dim=0), torch.cat(values, dim=0)

    def is_causal(self) -> bool:
        """Step 0 over all tokens is ordinary causal attention."""
        return self.step == 0 and self.live is None

    def attention_pass(self) -> AttentionPass:
        """What attention.py picks the kernel from: causal step 0; with every token live, step+1
        causal blocks of T keys; packed live queries: an arbitrary mask."""
        if self.live is not None:
            return AttentionPass("masked")
        return AttentionPass("causal") if self.step == 0 else AttentionPass("step_blocks", self.step + 1)

    def allowed_keys(self, device) -> torch.Tensor:
        """[T, (step+1) T], or [b, 1, width, (step+1) T] for packed queries; built once per
        pass (every layer of the pass shares it)."""
        if self._allowed is None:
            if self.live is None:
                self._allowed = stepwise_pass_mask(self.num_tokens, self.step, device)
            else:
                token = torch.arange(self.num_tokens, device=device)
                causal = token[None, None, :] <= self.live.positions.to(device).t()[:, :, None]  # [b, w, T]
                self._allowed = causal.repeat(1, 1, self.step + 1).unsqueeze(1)
        return self._allowed

    def mask_mod(self):
        """FlexAttention mask_mod: key slot j (step j // T, token j % T) is visible to query q
        iff its token is not after the query's token."""
        num_tokens = self.num_tokens
        if self.live is None:
            return lambda b, h, q, kv: kv % num_tokens <= q
        positions = self.live.positions.t()  # [b, width]
        return lambda b, h, q, kv: kv % num_tokens <= positions[b, q]
