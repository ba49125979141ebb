"""RoPE at explicit per-slot positions.

megatron-core's `RotaryEmbedding` always returns the table for positions 0..s-1 and GPTModel
ignores `position_ids` under RoPE. Latent slots need position t for every slot of token t, so
we index megatron-core's own table (same frequencies, same rotate-half convention) with the
slot positions; `apply_rotary_pos_emb` in the attention layers then works unchanged.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding


def rotary_at_positions(rotary: RotaryEmbedding, positions: torch.Tensor) -> torch.Tensor:
    """Rotary frequencies for each slot: positions [S] (shared by the batch) -> [S, 1, 1, dim]."""
    table = rotary(int(positions.max()) + 1)  # [max_pos + 1, 1, 1, dim]
    return table[positions.to(table.device)]
