"""Attention over several causal key blocks, one fused kernel call per block, merged by log-sum-exp.

Stepwise pass k (every token executing) attends, from step k of token t, the keys of steps
0..k of tokens t' <= t: k+1 blocks of T keys, each a plain causal T x T attention. Written as
one masked call, CUDA's SDPA cannot use flash (no arbitrary mask) nor memory-efficient
attention (no grouped-query attention) and falls to the math kernel, which keeps the
[b, np, T, (k+1) T] score matrix for backward. Here each block is one flash-attention call
(native GQA, causal, returning the row log-sum-exp), and the block outputs are merged exactly:

    L = logsumexp_j L_j,    O = sum_j exp(L_j - L) O_j

(the merge of FlashAttention-2's online softmax, Dao 2023, across kernel calls). Backward
calls each block's flash backward with the *merged* output and log-sum-exp, which makes every
block's probabilities exp(S_j - L) those of the whole softmax, so the per-block gradients are
exactly the blocks of the full attention's gradient (the ring-attention identity, Liu et al.
2023). Kept for backward: q, the keys/values (already alive in the KV store), the merged
output [b, np, T, hn] and log-sum-exp [b, np, T] fp32: no score matrix.

Kernels (`compat.flash_attention_forward` / `_backward`, torch's private flash ops, the only
ones that return the log-sum-exp): `aten._scaled_dot_product_flash_attention{,_backward}` on
CUDA (bf16/fp16), `aten._scaled_dot_product_flash_attention_for_cpu{,_backward}` on CPU (the
tests' path).
"""

from __future__ import annotations

import torch

from megatron_lcot.compat import flash_attention_backward, flash_attention_forward


def causal_blocks_attention(query, key, value, num_blocks: int, scale: float) -> torch.Tensor:
    """query [b, np, T, hn]; key/value [b, ng, num_blocks * T, hn] (ng divides np: GQA) ->
    [b, np, T, hn]: query i attends key i' <= i of every block."""
    if key.shape[2] != num_blocks * query.shape[2]:
        raise ValueError(
            f"causal blocks: {key.shape[2]} keys are not {num_blocks} blocks of {query.shape[2]}"
        )
    return _CausalBlocks.apply(query, key, value, num_blocks, scale)


class _CausalBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, num_blocks, scale):
        outputs, lses, saved = [], [], []
        for key_block, value_block in zip(key.chunk(num_blocks, dim=2), value.chunk(num_blocks, dim=2)):
            output, lse, extra = flash_attention_forward(query, key_block, value_block, scale)
            outputs.append(output)
            lses.append(lse)
            saved.append(extra)
        lse = torch.logsumexp(torch.stack(lses), dim=0)  # [b, np, T] fp32
        merged = sum(
            torch.exp(block_lse - lse).unsqueeze(-1) * output.float()
            for block_lse, output in zip(lses, outputs)
        ).to(query.dtype)
        ctx.save_for_backward(query, key, value, merged, lse)
        ctx.num_blocks, ctx.scale, ctx.extras = num_blocks, scale, saved
        return merged

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, merged, lse = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        grad_query = torch.zeros_like(query, dtype=torch.float32)
        grad_keys, grad_values = [], []
        blocks = zip(key.chunk(ctx.num_blocks, dim=2), value.chunk(ctx.num_blocks, dim=2), ctx.extras)
        for key_block, value_block, extra in blocks:
            dq, dk, dv = flash_attention_backward(
                grad_output, query, key_block, value_block, merged, lse, extra, ctx.scale
            )
            grad_query += dq.float()
            grad_keys.append(dk)
            grad_values.append(dv)
        return (
            grad_query.to(query.dtype),
            torch.cat(grad_keys, dim=2),
            torch.cat(grad_values, dim=2),
            None,
            None,
        )
