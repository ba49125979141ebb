"""Core attention for latent slots: megatron masks, structured stepwise passes, KV reuse.

Plugged in as `self_attention.submodules.core_attention` of every layer spec, so it replaces
megatron-core's DotProductAttention without patching megatron-core. It handles three kinds of
`attention_mask`, which TransformerBlock passes through untouched:

* `None`: plain causal attention (vanilla mode, the interleaved layout's slot sequence);
* a megatron bool tensor `[b or 1, 1, sq, sk]`, True = masked out (megatron's convention);
* a structured mask: any object with `expose(layer_number, key, value) -> (keys, values)` and
  `allowed_keys(device) -> bool [sq, sk] or [b, 1, sq, sk] or None` (None: every key), and
  optionally `is_causal() -> bool` (True: plain causal over the exposed keys, sq == sk; then
  no mask is materialised and `allowed_keys` is not called), `mask_mod()` (the same mask as
  a FlexAttention mask_mod; otherwise one is read from `allowed_keys`), and `queries(query)` /
  `context(context)` (the layout attention runs in: packed live tokens [N, 1] are laid out per
  sequence [widest, b] and back). `LatentPass` (model/engine.py) is one latent pass: this layer
  first writes what the pass exposes into the KV store's stream (its own keys, or for tokens
  that do not execute the pass those of their last executed step: KV reuse), then attends the
  visible streams (training, pipeline stages and cached decoding alike).

Backends (`config.core_attention_backend`, flag `--attention-backend`): `sdpa` (PyTorch's
fused scaled_dot_product_attention: is_causal without a mask where the mask is causal, else
the boolean mask; on CUDA PyTorch picks flash / memory-efficient / cuDNN from what the mask
allows), `flex` (FlexAttention with a block mask built once per pass from the structured
mask's `mask_mod`: fully masked blocks are skipped; compiled on CUDA; PyTorch 2.13 runs it on
CPU in eager mode forward only, no backward), and `dense` (explicit softmax(QK^T) V with the
mask materialised: the reference the others are tested against). `auto` = `sdpa`, the fastest
correct path measured on CPU; on CUDA flex is not yet measured here, so it is not chosen
automatically.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
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
        backend = getattr(config, "core_attention_backend", "auto")
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"core_attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        self.backend = "sdpa" if backend == "auto" else backend

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
        if getattr(self.config, "latent_recompute", None) == "selective" and torch.is_grad_enabled():
            # selective recompute: keep q/k/v of this pass (and the store's per-step entries,
            # which live anyway), rebuild the concatenated keys and the attention in backward
            return torch.utils.checkpoint.checkpoint(self._attend, query, key, value, attention_mask,
                                                     attn_mask_type, use_reentrant=False)
        return self._attend(query, key, value, attention_mask, attn_mask_type)

    def _attend(self, query, key, value, attention_mask, attn_mask_type) -> torch.Tensor:
        structured = attention_mask if hasattr(attention_mask, "expose") else None
        if structured is not None:  # a LatentPass (model/engine.py)
            key, value = structured.expose(self.layer_number, key, value)
            query = structured.queries(query) if hasattr(structured, "queries") else query
            is_causal = getattr(structured, "is_causal", lambda: False)()
            allowed = None if is_causal else structured.allowed_keys(query.device)
        elif attention_mask is None:
            allowed, is_causal = None, attn_mask_type == AttnMaskType.causal
        else:
            allowed, is_causal = ~attention_mask, False  # megatron: True = masked out

        sq, b, np_, hn = query.shape
        query, key, value = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, hn]
        dropout_p = self.dropout_p if self.training else 0.0
        if self.backend == "sdpa":
            context = F.scaled_dot_product_attention(
                query, key, value, attn_mask=allowed, dropout_p=dropout_p, is_causal=is_causal,
                scale=self.softmax_scale, enable_gqa=key.shape[1] != np_,
            )
        elif self.backend == "flex":
            if dropout_p > 0:
                raise ValueError("--attention-backend flex does not support attention dropout")
            block_mask = _block_mask(structured, allowed, is_causal, query, key)
            context = _flex_attention(query.device)(
                query, key, value, block_mask=block_mask, scale=self.softmax_scale,
                enable_gqa=key.shape[1] != np_,
            )
        else:
            context = dense_attention(query, key, value, allowed, is_causal, self.softmax_scale, dropout_p)
        context = context.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
        return structured.context(context) if hasattr(structured, "context") else context


ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "dense")


def dense_attention(query, key, value, allowed, is_causal, scale, dropout_p=0.0) -> torch.Tensor:
    """The reference: softmax(scale QK^T, masked) V with the mask materialised.

    query [b, np, sq, hn], key/value [b, ng, sk, hn]; allowed: bool (True = attend)
    broadcastable to [b, np, sq, sk], or None; is_causal: query i sees keys <= i.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = scale * query @ key.transpose(-1, -2)  # [b, np, sq, sk]
    if is_causal:
        allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = F.dropout(torch.softmax(scores, dim=-1), p=dropout_p)
    return probs @ value


def _flex_attention(device):
    """flex_attention, compiled on CUDA (eager flex materialises the scores: only a reference)."""
    global _COMPILED_FLEX
    if device.type != "cuda":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


_COMPILED_FLEX = None


def _block_mask(structured, allowed, is_causal, query, key):
    """The FlexAttention block mask of this call, built once per structured mask (every layer
    of a pass shares it) from its `mask_mod`, once per shape for plain causal attention, else
    from the materialised mask."""
    cached = getattr(structured, "_flex_block_mask", None)
    if cached is not None:
        return cached
    causal_key = (query.shape[0], query.shape[2], key.shape[2], query.device)
    if structured is None and is_causal and causal_key in _CAUSAL_BLOCK_MASKS:
        return _CAUSAL_BLOCK_MASKS[causal_key]
    if structured is not None and hasattr(structured, "mask_mod"):
        mask_mod = structured.mask_mod()
    elif is_causal:
        mask_mod = lambda b, h, q, kv: kv <= q  # noqa: E731
    elif allowed is None:
        mask_mod = lambda b, h, q, kv: q >= 0  # noqa: E731
    else:
        allowed4 = allowed.expand(query.shape[0], 1, query.shape[2], key.shape[2]) if allowed.dim() == 4 \
            else allowed.expand(query.shape[0], 1, *allowed.shape)
        mask_mod = lambda b, h, q, kv: allowed4[b, 0, q, kv]  # noqa: E731
    block_mask = create_block_mask(mask_mod, query.shape[0], None, query.shape[2], key.shape[2],
                                   device=query.device)
    if structured is not None:
        structured._flex_block_mask = block_mask
    elif is_causal:
        _CAUSAL_BLOCK_MASKS[causal_key] = block_mask
    return block_mask


_CAUSAL_BLOCK_MASKS = {}  # (batch, sq, sk, device) -> the causal block mask (vanilla, interleaved)
