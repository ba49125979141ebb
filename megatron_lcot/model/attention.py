"""Core attention for latent slots: megatron masks, structured stepwise passes, KV reuse.

Plugged in as `self_attention.submodules.core_attention` of every layer spec, so it replaces
megatron-core's DotProductAttention without patching megatron-core. It handles three kinds of
`attention_mask`, which TransformerBlock passes through untouched:

* `None`: plain causal attention (vanilla mode, the interleaved layout's slot sequence);
* a megatron bool tensor `[b or 1, 1, sq, sk]`, True = masked out (megatron's convention);
* a structured mask: any object with `expose(layer_number, key, value) -> (keys, values)` and
  `allowed_keys(device) -> bool [sq, sk] or None`. `StepwisePass` (masking.py) is pass k of the
  stepwise layout: queries are step k of all T tokens; keys are steps 0..k, read from the
  pass's per-layer KV store, into which this layer first writes what step k exposes (its own
  keys, or for tokens that halted before step k the keys of their last executed step: KV
  reuse). An inference KV cache is the same protocol with one entry per decoded slot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class LcotCoreAttention(MegatronModule):
    """Scaled dot-product attention over per-partition heads; signature of DotProductAttention.

    Inputs (sequence first, heads local to this tensor-parallel rank):
        query [sq, b, np, hn], key/value [sk, b, ng, hn] (GQA: ng query groups)
    Returns [sq, b, np * hn].
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("LcotCoreAttention does not support context parallelism")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale if softmax_scale is not None else config.kv_channels**-0.5
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("LcotCoreAttention supports neither attention_bias nor packed sequences")
        attn_mask_type = attn_mask_type or self.attn_mask_type
        is_causal = False
        if hasattr(attention_mask, "expose"):  # a structured mask (StepwisePass, inference cache)
            key, value = attention_mask.expose(self.layer_number, key, value)
            allowed = attention_mask.allowed_keys(query.device)  # [sq, (k+1) sq]
        elif attention_mask is None:
            allowed, is_causal = None, attn_mask_type == AttnMaskType.causal
        else:
            allowed = ~attention_mask  # megatron: True = masked out; SDPA: True = attend

        sq, b, np_, hn = query.shape
        context = F.scaled_dot_product_attention(
            query.permute(1, 2, 0, 3),  # [b, np, sq, hn]
            key.permute(1, 2, 0, 3),  # [b, ng, sk, hn]
            value.permute(1, 2, 0, 3),
            attn_mask=allowed,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=is_causal,
            scale=self.softmax_scale,
            enable_gqa=key.shape[2] != np_,
        )
        return context.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
