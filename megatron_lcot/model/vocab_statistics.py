"""Per-token statistics of vocab-parallel logits, forward-only, one tensor-parallel collective each.

The correctness penalty needs the gold token's probability and the entropy router the
prediction's entropy, both under stop-gradient. Megatron-core's vocab-parallel cross-entropy
would give the first, but it is an autograd function that writes the softmax out for backward
(five passes over the vocabulary and two collectives); a fused `logsumexp` per shard and one
all-gather of the per-shard results give the same numbers in two passes.

Every function takes logits [..., V / tp] (this rank's vocabulary shard, as the output layer
returns them with parallel_output) and returns fp32 [...].
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_lcot import parallel


def _gather_over_shards(local: torch.Tensor) -> torch.Tensor:
    """[tp, *local.shape]: every tensor-parallel rank's `local`, in rank order."""
    return parallel.all_gather(local, group=parallel_state.get_tensor_model_parallel_group())


def gold_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label]; labels [...] hold global token ids.

    Each shard contributes its log-normaliser and its gold logit (-inf where the label lies in
    another shard); a logsumexp over the shards of each is exact, since exactly one gold entry
    is finite."""
    logits = logits.float()
    shard = logits.shape[-1]
    first = parallel_state.get_tensor_model_parallel_rank() * shard
    local = labels - first
    in_shard = (local >= 0) & (local < shard)
    gold = logits.gather(-1, local.clamp(0, shard - 1).unsqueeze(-1)).squeeze(-1)
    gold = torch.where(in_shard, gold, torch.full_like(gold, float("-inf")))
    gathered = _gather_over_shards(torch.stack([torch.logsumexp(logits, -1), gold]))
    normaliser, gold = torch.logsumexp(gathered, 0)
    return gold - normaliser


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = log Z - sum_v p_v l_v, in nats. Per shard r: its log-normaliser log Z_r and the mean
    logit under its own softmax m_r; then log Z = logsumexp_r log Z_r and
    sum_v p_v l_v = sum_r exp(log Z_r - log Z) m_r."""
    logits = logits.float()
    shard_normaliser = torch.logsumexp(logits, -1)
    shard_mean = (torch.softmax(logits, -1) * logits).sum(-1)
    shard_normalisers, shard_means = _gather_over_shards(torch.stack([shard_normaliser, shard_mean])).unbind(
        1
    )
    normaliser = torch.logsumexp(shard_normalisers, 0)
    return normaliser - (torch.exp(shard_normalisers - normaliser) * shard_means).sum(0)
