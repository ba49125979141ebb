"""Attention masks and position ids of the two latent layouts (METHOD.md section 2).

Slot (t, k) is token t at latent step k (k = 0: the token itself). Masks here are boolean with
True = may attend (SDPA's convention; megatron's is the opposite and is converted in attention.py).

* Dense references over all T(K+1) slots, obviously correct, used by tests and docs:
  `interleaved_dense_mask` (token-major slot order x1 z11..z1K x2 ...: plain causal) and
  `stepwise_dense_mask` (step-major order: (t,k) sees (t',k') iff t' <= t and k' <= k).
* The structured form the model runs: `StepwisePass`, one per stepwise pass k, whose mask is
  `stepwise_pass_mask(T, k)` (rows of the dense mask for step k, columns of steps 0..k) and
  which carries the per-layer KV store those columns are read from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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


@dataclass
class StepwisePass:
    """The `attention_mask` of stepwise pass `step` (the structured mask attention.py reads).

    executing: [T, b] bool, the tokens that execute this step; a token that does not exposes,
    in every layer, the keys/values of its previous step, i.e. of its last executed step
    (KV reuse). None means every token executes.
    """

    step: int
    num_tokens: int
    store: StepwiseKVStore
    executing: torch.Tensor | None = None

    def expose(self, layer_number: int, key: torch.Tensor, value: torch.Tensor):
        """Record what this step exposes in `layer_number`; return keys/values of steps 0..step.

        key/value: [T, b, ng, hn] -> [(step+1) T, b, ng, hn]. Writing at index `step` (not
        appending) makes a re-run of the same pass overwrite its entry.
        """
        keys = self.store.keys.setdefault(layer_number, [])
        values = self.store.values.setdefault(layer_number, [])
        del keys[self.step :], values[self.step :]
        if self.executing is not None and self.step > 0:
            executing = self.executing[:, :, None, None]
            key = torch.where(executing, key, keys[-1])
            value = torch.where(executing, value, values[-1])
        keys.append(key)
        values.append(value)
        return torch.cat(keys, dim=0), torch.cat(values, dim=0)

    def allowed_keys(self, device) -> torch.Tensor:
        return stepwise_pass_mask(self.num_tokens, self.step, device)
