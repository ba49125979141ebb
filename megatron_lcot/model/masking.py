"""Attention masks and position ids of the two latent layouts (docs/method.md).

Slot (t, k) is token t at latent step k (k = 0: the token itself). Masks here are boolean with
True = may attend (SDPA's convention; megatron's is the opposite and is converted in attention.py).

* Dense references over all T(K+1) slots, obviously correct, used by tests and docs:
  `interleaved_dense_mask` (token-major slot order x1 z11..z1K x2 ...: plain causal) and
  `stepwise_dense_mask` (step-major order: (t,k) sees (t',k') iff t' <= t and k' <= k).
* `stepwise_pass_mask(T, k)`: rows of the dense mask for step k, columns of steps 0..k, the
  mask of a training pass over every token; model/engine.py's `LatentPass` is the structured
  form every pass runs (packed live tokens, a decoding cache's earlier entries and padding).
"""

from __future__ import annotations

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
