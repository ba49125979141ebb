"""The entropy of vocab-parallel logits, forward-only, with one tensor-parallel collective.

The entropy router reads the entropy of each step's own prediction under stop-gradient. The
logits are split over the tensor-parallel ranks' vocabulary shards; instead of gathering them,
each rank reduces its shard to two numbers per token (its log-normaliser and its mean logit) and
one all-gather of those gives the exact entropy of the whole vocabulary.

`vocab_parallel_entropy` takes logits [..., V / tp] (this rank's vocabulary shard, as the output
layer returns them with parallel_output) and returns fp32 [...].
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_lcot import parallel


def vocab_parallel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = log Z - sum_v p_v l_v, in nats. Per shard r: its log-normaliser log Z_r and the mean
    logit under its own softmax m_r; then log Z = logsumexp_r log Z_r and
    sum_v p_v l_v = sum_r exp(log Z_r - log Z) m_r."""
    logits = logits.float()
    local = torch.stack([torch.logsumexp(logits, -1), (torch.softmax(logits, -1) * logits).sum(-1)])
    shards = parallel.all_gather(
        local, group=parallel_state.get_tensor_model_parallel_group()
    )  # [tp, 2, ...]
    shard_normalisers, shard_means = shards.unbind(1)
    normaliser = torch.logsumexp(shard_normalisers, 0)
    return normaliser - (torch.exp(shard_normalisers - normaliser) * shard_means).sum(0)
