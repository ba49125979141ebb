"""Forward-only statistics of vocab-parallel logits, read by the halting under stop-gradient.

The logits are split over the tensor-parallel ranks' vocabulary shards ([..., V / tp], as the
output layer returns them with parallel_output); each function reduces its rank's shard and
combines the shards with collectives, never gathering the logits. Both return fp32 [...].

* `vocab_parallel_entropy`: the entropy of each step's own prediction (the entropy router's
  input), with one all-gather of two numbers per token.
* `vocab_parallel_nll`: the gold token's negative log-likelihood (the correctness penalty's
  p = exp(-nll)), bit for bit megatron-core's vocab-parallel cross-entropy forward without its
  softmax division (kept for a backward the penalty never runs) and with `amax` for its
  `max(dim)`, which computes indices it discards.

`head_statistic` runs the LM head and one of these statistics on row chunks
(`logits_chunk_rows`): a chunk's logits are written, reduced and freed while still in cache on
CPU, and bounded in memory on CUDA.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.utils import VocabUtility

from megatron_lcot import parallel

# Bytes of fp32 logits one chunk may hold, by device type. CPU: about a core's L2 and a slice of
# L3, so the head's output and the statistic's passes over it stay in cache instead of making
# one trip to memory each. CUDA (and other accelerators): large enough that a chunk's kernels
# are few and saturating; it caps the chunk's fp32 logits, and the statistic's temporaries are a
# few times that.
LOGITS_CHUNK_BYTES = {"cpu": 4 * 2**20, "cuda": 512 * 2**20}


def logits_chunk_rows(vocab_shard: int, device: torch.device) -> int:
    """Rows whose fp32 logits over a vocabulary shard of `vocab_shard` fit one chunk (>= 1)."""
    budget = LOGITS_CHUNK_BYTES.get(device.type, LOGITS_CHUNK_BYTES["cuda"])
    return max(1, budget // (4 * vocab_shard))


def head_statistic(output_layer, states: torch.Tensor, statistic, *row_inputs) -> torch.Tensor:
    """statistic(output_layer(states)) in row chunks, forward-only: states [m, h] through the LM
    head (a ColumnParallelLinear with parallel output) to logits [c, 1, V / tp] per chunk of
    `logits_chunk_rows` rows, then statistic(logits, *row inputs' chunks [c, 1]) -> [c, 1].
    Returns [m] fp32. A row's statistic does not depend on the other rows (the matmul's blocking
    for another chunk height may round a last bit differently); each chunk runs the statistic's
    collectives once; m = 0 runs one empty chunk and returns [0]."""
    states = states.detach()  # a view of a graph tensor made under no_grad would still ask for grad
    rows = logits_chunk_rows(output_layer.output_size_per_partition, states.device)
    values = []
    for start in range(0, max(states.shape[0], 1), rows):
        logits, _ = output_layer(states[start : start + rows].unsqueeze(1))
        chunk_inputs = (row_input[start : start + rows].unsqueeze(1) for row_input in row_inputs)
        values.append(statistic(logits, *chunk_inputs)[:, 0])
    return torch.cat(values)


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


def vocab_parallel_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log p(target) for logits [..., V / tp] and target [...] (ids of the whole vocabulary).

    The operations of megatron-core's `vocab_parallel_cross_entropy` forward, in its order and
    through its own `calculate_predicted_logits`, so the result is bitwise the same (the
    penalty's hard halting decisions would amplify a rounding difference); the max is `amax`
    (the same values, no indices). Overwrites fp32 `logits`.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    logits = logits.float()
    logits_max = parallel.all_reduce(logits.amax(dim=-1), group, op=torch.distributed.ReduceOp.MAX)
    vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(
        logits.shape[-1],
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )
    _, _, predicted_logits, sum_exp_logits, _ = VocabParallelCrossEntropy.calculate_predicted_logits(
        logits, target, logits_max, vocab_start, vocab_end
    )
    parallel.all_reduce(predicted_logits, group)
    parallel.all_reduce(sum_exp_logits, group)
    return torch.log(sum_exp_logits) - predicted_logits
