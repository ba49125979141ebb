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
  a FlexAttention mask_mod; otherwise one is read from `allowed_keys`), `attention_pass()`
  (an `AttentionPass` saying what structure the mask has, which picks the kernel; without it
  the pass is causal if `is_causal()`, else an arbitrary mask), and `queries(query)` /
  `context(context)` (the layout attention runs in: packed live tokens [N, 1] are laid out per
  sequence [widest, b] and back). `LatentPass` (model/engine.py) is one latent pass: this layer
  first writes what the pass exposes into the KV store's stream (its own keys, or for tokens
  that do not execute the pass those of their last executed step: KV reuse), then attends the
  visible streams (training, pipeline stages and cached decoding alike).

Backends (`config.core_attention_backend`, flag `--attention-backend`): `auto` (= `sdpa`) runs
each pass with the call `attention_call` picks from a small description of the pass
(`AttentionPass`: causal, every key, k+1 causal step blocks, or an arbitrary mask) and the
device, so that on CUDA no pass reaches SDPA's math kernel (which keeps the full score matrix):

| pass                                   | CUDA (bf16/fp16)                | CPU                        |
|----------------------------------------|---------------------------------|----------------------------|
| causal (vanilla, interleaved, step 0)  | SDPA is_causal, native GQA: flash | same (CPU flash)         |
| stepwise pass k, every token live      | k+1 flash calls merged by LSE   | SDPA + mask, GQA (CPU flash) |
| packed live queries, megatron masks    | SDPA + mask, KV heads expanded: memory-efficient | SDPA + mask, GQA |

In fp32 on CUDA flash is unavailable, so every pass takes the memory-efficient kernel with KV
heads expanded. `flex` runs FlexAttention with a block mask built once per pass from the
structured mask's `mask_mod` (fully masked blocks skipped), compiled on CUDA with the packed
query width padded to a power of two (at least 128) so the compile cache holds a bounded
number of shapes; PyTorch 2.13 runs it on CPU in eager mode forward only. `dense` is the
explicit softmax(QK^T) V with the mask materialised: the reference the others are tested
against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from megatron_lcot.compat import raise_recompile_limit
from megatron_lcot.model.attention_pass import AttentionPass
from megatron_lcot.model.causal_blocks import causal_blocks_attention


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
            return torch.utils.checkpoint.checkpoint(
                self._attend, query, key, value, attention_mask, attn_mask_type, use_reentrant=False
            )
        return self._attend(query, key, value, attention_mask, attn_mask_type)

    def _attend(self, query, key, value, attention_mask, attn_mask_type) -> torch.Tensor:
        structured = attention_mask if hasattr(attention_mask, "expose") else None
        if structured is not None:  # a LatentPass (model/engine.py)
            key, value = structured.expose(self.layer_number, key, value)
            query = structured.queries(query) if hasattr(structured, "queries") else query
            described = describe_pass(structured)
        elif attention_mask is None:
            described = AttentionPass("causal" if attn_mask_type == AttnMaskType.causal else "full")
        else:
            described = AttentionPass("masked")

        def allowed_keys():  # bool, True = attend; materialised only by the calls that need it
            if structured is not None:
                return structured.allowed_keys(query.device)
            return ~attention_mask  # megatron: True = masked out

        sq, b, np_, hn = query.shape
        query, key, value = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, hn]
        dropout_p = self.dropout_p if self.training else 0.0
        call = attention_call(self.backend, plan_device(query), described, query.dtype, dropout_p)
        if call == "flex":
            if dropout_p > 0:
                raise ValueError("--attention-backend flex does not support attention dropout")
            context = _flex(structured, described, allowed_keys, query, key, value, self.softmax_scale)
        elif call == "dense":
            mask = None if described.kind in ("causal", "full") else allowed_keys()
            context = dense_attention(
                query, key, value, mask, described.kind == "causal", self.softmax_scale, dropout_p
            )
        elif call == "causal_blocks":
            context = causal_blocks_attention(query, key, value, described.blocks, self.softmax_scale)
        else:
            has_mask, gqa = SDPA_CALLS[call]
            mask = allowed_keys() if has_mask else None
            if not gqa:
                key, value = (x.repeat_interleave(np_ // x.shape[1], dim=1) for x in (key, value))
            context = F.scaled_dot_product_attention(
                query,
                key,
                value,
                attn_mask=mask,
                dropout_p=dropout_p,
                is_causal=described.kind == "causal",
                scale=self.softmax_scale,
                enable_gqa=key.shape[1] != np_,
            )
        context = context.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
        return structured.context(context) if hasattr(structured, "context") else context


def describe_pass(structured) -> AttentionPass:
    """The `AttentionPass` of a structured mask (its own `attention_pass()` when it has one)."""
    if hasattr(structured, "attention_pass"):
        return structured.attention_pass()
    if getattr(structured, "is_causal", lambda: False)():
        return AttentionPass("causal")
    return AttentionPass("masked")


# The calls attention_call chooses from. SDPA calls, as (passes a mask, keeps KV heads grouped):
#   flash_gqa          no mask (is_causal per the pass), GQA native
#   unmasked_expanded  no mask (is_causal per the pass), KV heads expanded to the query heads
#   masked_expanded    the boolean mask, KV heads expanded
#   masked_gqa         the boolean mask and GQA: only the math kernel on CUDA, so CPU only
# and causal_blocks (k+1 causal flash calls merged by log-sum-exp, causal_blocks.py), flex, dense.
SDPA_CALLS = {
    "flash_gqa": (False, True),
    "unmasked_expanded": (False, False),
    "masked_expanded": (True, False),
    "masked_gqa": (True, True),
}


def attention_call(
    backend: str, device_type: str, described: AttentionPass, dtype: torch.dtype, dropout_p: float = 0.0
) -> str:
    """The call that runs a pass: a pure function of backend, device type, pass and dtype.

    On CUDA every choice has a fused kernel (`cuda_fused_kernels` is never empty); on CPU SDPA
    with a mask and GQA runs CPU flash attention, the fastest path measured there.
    """
    if backend in ("flex", "dense"):
        return backend
    unmasked = described.kind in ("causal", "full")
    if device_type != "cuda":
        return "flash_gqa" if unmasked else "masked_gqa"
    flash = dtype in (torch.float16, torch.bfloat16)
    if unmasked:
        return "flash_gqa" if flash else "unmasked_expanded"
    if described.kind == "step_blocks" and flash and dropout_p == 0.0:
        return "causal_blocks"
    return "masked_expanded"


def cuda_fused_kernels(call: str, dtype: torch.dtype) -> tuple:
    """The fused kernels CUDA can run `call` with, by the installed torch's documented
    constraints: flash takes no arbitrary mask and needs fp16/bf16 (GQA native); memory-
    efficient takes a mask and fp32 but no GQA. Empty: SDPA would fall to the math kernel."""
    half = dtype in (torch.float16, torch.bfloat16)
    if call == "causal_blocks":
        return ("flash",) if half else ()
    if call in ("flex", "dense"):
        return ("flex",) if call == "flex" else ()
    has_mask, gqa = SDPA_CALLS[call]
    return (("flash",) if half and not has_mask else ()) + (("efficient",) if not gqa else ())


def plan_device(tensor: torch.Tensor) -> str:
    """The device type whose policy a call follows (tests run CUDA's plan on CPU tensors)."""
    return tensor.device.type


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


def _flex(structured, described: AttentionPass, allowed_keys, query, key, value, scale) -> torch.Tensor:
    """FlexAttention of one call: queries of a masked pass padded to `flex_query_bucket` rows
    (the padding rows attend nothing and are cut off), so compiled kernels see few shapes."""
    width = query.shape[2]
    bucket = width if described.kind in ("causal", "full") else flex_query_bucket(width)
    padded = F.pad(query, (0, 0, 0, bucket - width))
    block_mask = _block_mask(structured, described, allowed_keys, padded, key, width)
    flex = _compiled_flex() if query.device.type == "cuda" else flex_attention
    context = flex(
        padded, key, value, block_mask=block_mask, scale=scale, enable_gqa=key.shape[1] != query.shape[1]
    )
    return context[:, :, :width]


def flex_query_bucket(width: int) -> int:
    """Rows a masked pass's queries are padded to: a power of two, at least 128 (one block).
    Fully masked padding blocks are skipped, so the padding costs no attention work, and a
    sequence of T tokens gives at most log2(T / 128) + 1 query shapes per pass."""
    return max(128, 1 << (width - 1).bit_length())


def _compiled_flex():
    """flex_attention compiled once (eager flex materialises the scores: only a reference);
    static shapes, recompiled per (query bucket, key length) up to FLEX_RECOMPILE_LIMIT."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        raise_recompile_limit(FLEX_RECOMPILE_LIMIT)
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


_COMPILED_FLEX = None
FLEX_RECOMPILE_LIMIT = 64  # query buckets (<= 8 up to 16k tokens) x key lengths (K + 1) x causal shapes


def _block_mask(structured, described: AttentionPass, allowed_keys, query, key, width: int):
    """The FlexAttention block mask of this call, built once per structured mask (every layer
    of a pass shares it) from its `mask_mod`, once per shape for plain causal attention, else
    from the materialised mask. Query rows from `width` on are padding: masked out."""
    cached = getattr(structured, "_flex_block_mask", None)
    if cached is not None:
        return cached
    is_causal = described.kind == "causal"
    causal_key = (query.shape[0], query.shape[2], key.shape[2], query.device)
    if structured is None and is_causal and causal_key in _CAUSAL_BLOCK_MASKS:
        return _CAUSAL_BLOCK_MASKS[causal_key]
    if is_causal:
        mask_mod = lambda b, h, q, kv: kv <= q  # noqa: E731
    elif described.kind == "full":
        mask_mod = lambda b, h, q, kv: q >= 0  # noqa: E731
    else:
        if structured is not None and hasattr(structured, "mask_mod"):
            inner = structured.mask_mod()
        else:
            allowed = allowed_keys()
            allowed4 = (
                allowed.expand(query.shape[0], 1, width, key.shape[2])
                if allowed.dim() == 4
                else allowed.expand(query.shape[0], 1, *allowed.shape)
            )
            inner = lambda b, h, q, kv: allowed4[b, 0, q, kv]  # noqa: E731
        mask_mod = lambda b, h, q, kv: (q < width) & inner(b, h, q.clamp(max=width - 1), kv)  # noqa: E731
    block_mask = create_block_mask(
        mask_mod, query.shape[0], None, query.shape[2], key.shape[2], device=query.device
    )
    if structured is not None:
        structured._flex_block_mask = block_mask
    elif is_causal:
        _CAUSAL_BLOCK_MASKS[causal_key] = block_mask
    return block_mask


_CAUSAL_BLOCK_MASKS = {}  # (batch, sq, sk, device) -> the causal block mask (vanilla, interleaved)
