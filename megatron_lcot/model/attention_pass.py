"""The description of one attention pass that the core attention picks its kernel from.

Whatever builds the structured `attention_mask` of a pass (a stepwise pass, packed live slots,
an inference cache) says through `attention_pass()` what structure its mask has; attention.py's
`attention_call` maps that, the device and the dtype to one fused call. Keeping the interface
this small lets the pass objects change their layout (packing, KV store) without touching the
kernel choice, as long as the kind still describes the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

PASS_KINDS = ("causal", "full", "step_blocks", "masked")


@dataclass(frozen=True)
class AttentionPass:
    """kind: 'causal' (query i sees keys <= i, sq == sk), 'full' (every key), 'step_blocks'
    (the keys are `blocks` blocks of sq keys each, and query i sees key i' <= i of every block:
    stepwise pass blocks - 1 with every token live), 'masked' (an arbitrary boolean mask from
    `allowed_keys`: packed live queries, megatron masks, an inference cache)."""

    kind: str
    blocks: int = 1

    def __post_init__(self):
        if self.kind not in PASS_KINDS:
            raise ValueError(f"AttentionPass kind must be one of {PASS_KINDS}, got {self.kind!r}")
        if self.blocks < 1 or (self.blocks != 1 and self.kind != "step_blocks"):
            raise ValueError(f"AttentionPass: blocks={self.blocks} only with kind 'step_blocks' (>= 1)")
