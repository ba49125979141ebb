"""LcotConfig: megatron-core's TransformerConfig plus the latent-thought fields.

One config object travels through every spec'd submodule (decoder layers, latent schedule,
halting router), so a submodule reads what it needs from `config` as megatron-core's do.
The field names match the CLI flags (`--latent-steps` -> `latent_steps`). Validation of user
input with flag-naming messages lives in `megatron_lcot.arguments`; `__post_init__` here only
guards programmatic misuse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

LATENT_LAYOUTS = ("stepwise", "interleaved")
HALTING_RULES = ("none", "adaptive")
HALTING_ROUTERS = ("linear", "entropy")
RECOMPUTE_GRANULARITIES = (None, "selective", "full")


@dataclass
class LcotConfig(TransformerConfig):
    """TransformerConfig with the latent-thought recurrence and halting fields (docs/method.md)."""

    latent_steps: int = 0
    """K: latent thoughts per token. 0 = vanilla GPT, identical to megatron-core's GPTModel."""

    latent_layout: str = "stepwise"
    """'stepwise' (K+1 exact passes; slot (t,k) sees (t',k') iff t'<=t, k'<=k) or
    'interleaved' (PonderLM-2: causal over x1 z11..z1K x2 ..., trained with Jacobi passes)."""

    halting: str = "none"
    """'none' (every token runs K steps) or 'adaptive' (per-step router, pruning, KV reuse)."""

    halting_router: str = "linear"
    """Adaptive halting's router (halting.py): 'linear' (a gate on the step's state) or 'entropy'
    (the same gate also reading the entropy of the step's own prediction; one forward-only LM
    head per gated token)."""

    halting_threshold: float = 0.05
    """tau: step k of a token is not executed once its reach r(t,k) falls below tau."""

    halting_loss_weight: float = 0.1
    """lambda of the correctness-aware halting loss."""

    halting_correctness_exponent: float = 1.0
    """beta: the penalty uses sg(p_gold)^beta; larger beta prunes less."""

    halting_warmup_iters: int = 0
    """Training iterations W of the halting warm-up, over which the halting loss weight ramps from
    0 to lambda (halting.HaltingRouter). 0 = prune and penalise at full weight from the first step."""

    halting_warmup_ramp_threshold: bool = False
    """During the warm-up, prune at a threshold ramped from 0 to tau (tau i / W) instead of not
    pruning at all: the warm-up's cost falls as the router learns to halt (docs/method.md)."""

    halting_penalty_fraction: float = 1.0
    """Share of each gated step's executed tokens whose gold probability the correctness penalty
    computes in training: a seeded uniform sample without replacement, its terms scaled by
    executed / sampled, so the penalty's expectation is unchanged and its forward-only LM head
    costs this share (loss.py). Evaluation always computes every term."""

    halting_init_continue_prob: float = 0.9
    """Initial continue probability of every router gate (bias init), so most tokens think."""

    jacobi_iters: tuple = (2, 3)
    """Interleaved layout: Jacobi iterations drawn uniformly per training step (PonderLM-2)."""

    jacobi_eval_iters: int = 3
    """Interleaved layout: Jacobi iterations at evaluation."""

    core_attention_backend: str = "auto"
    """LcotCoreAttention's kernel: 'sdpa' (a fused call per pass type and device, never CUDA's
    math kernel), 'flex' (FlexAttention block masks), 'dense' (the materialised-mask reference)
    or 'auto' (= sdpa). See attention.py."""

    latent_recompute: str = None
    """Activation recompute (flag --recompute-granularity): None; 'selective' = every core
    attention call under torch.utils.checkpoint (use_reentrant=False): the per-pass concatenation
    of the KV store (O(K^2 T) saved) is rebuilt in backward instead of kept; 'full' = each latent pass under torch.utils.checkpoint, so only the pass inputs and the
    KV store stay in memory, and in vanilla mode megatron-core's full recompute of every layer. megatron-core's own full/core-attention recompute would be
    silently wrong in latent modes, hence a field of ours."""

    seed: int = 1234
    """--seed. With `use_cpu_initialization`, initial weights are drawn from streams seeded by it
    and the global layer number, so every TP/PP layout starts from the same weights
    (seeded_init.py)."""

    embedding_scale: float = field(default=None)
    """Token embeddings are multiplied by this before the decoder. None: 1 in vanilla mode,
    1/init_method_std = sqrt(2.5 h) with the PonderLM-2 init in latent modes, so token slots
    have the RMS (~1) of the normalised hidden states fed back as latent thoughts."""

    def __post_init__(self) -> None:
        if self.latent_recompute not in RECOMPUTE_GRANULARITIES:
            raise ValueError(f"latent_recompute must be one of {RECOMPUTE_GRANULARITIES}")
        if self.latent_recompute == "full" and self.latent_steps == 0:
            self.recompute_granularity, self.recompute_method, self.recompute_num_layers = (
                "full",
                "uniform",
                1,
            )
        super().__post_init__()
        if self.latent_steps < 0:
            raise ValueError(f"latent_steps must be >= 0, got {self.latent_steps}")
        if self.latent_layout not in LATENT_LAYOUTS:
            raise ValueError(f"latent_layout must be one of {LATENT_LAYOUTS}")
        if self.halting not in HALTING_RULES:
            raise ValueError(f"halting must be one of {HALTING_RULES}")
        if self.halting_router not in HALTING_ROUTERS:
            raise ValueError(f"halting_router must be one of {HALTING_ROUTERS}")
        if self.embedding_scale is None:
            self.embedding_scale = 1.0 if self.latent_steps == 0 else 1.0 / self.init_method_std

    @property
    def adaptive(self) -> bool:
        return self.latent_steps > 0 and self.halting == "adaptive"


def llama_config(
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    ffn_hidden_size: int | None = None,
    num_query_groups: int | None = None,
    init_method_std: float | None = None,
    **latent_and_parallel_fields,
) -> LcotConfig:
    """A Llama-style LcotConfig: RMSNorm (eps 1e-5), SwiGLU, no biases, no dropout.

    `init_method_std` defaults to PonderLM-2's sqrt(2 / (5 h)); megatron-core already divides
    the output projections' std by sqrt(2 L).
    """
    if init_method_std is None:
        init_method_std = math.sqrt(2.0 / (5.0 * hidden_size))
    return LcotConfig(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups,
        ffn_hidden_size=ffn_hidden_size or 4 * hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=init_method_std,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        **latent_and_parallel_fields,
    )
