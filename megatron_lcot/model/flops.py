"""FLOPs per token of every mode, training and inference (docs/method.md).

What is counted, as in Megatron-LM's formula: matrix multiplications only (2 FLOPs per
multiply-add). Per slot and layer, the linear layers (QKV, output projection, MLP) and the
attention over the keys that slot's query actually sees under its mask (QK^T and AV:
2 x 2 x keys x heads x head_dim). Per predicted token, the LM head (2 h V). Backward = 2 x
forward for everything in the autograd graph. Not counted: norms, activations, softmax,
RoPE, the embedding lookup, the loss (a few percent at these sizes, and none of them matmuls).

Key counts over a sequence of T tokens (t = 1..T):
* causal pass over n slots per token (vanilla n = 1; interleaved n = K+1, or k during the
  Jacobi warm-up pass k): the i-th slot sees i keys, i.e. n (n T + 1) / 2 keys per token;
* stepwise step k: slot (t, k) sees steps 0..k of tokens 1..t, (k+1) t keys, i.e.
  (k+1)(T+1)/2 per token. KV reuse keeps this count for every executed query (a halted token's
  entries still exist, they repeat its last executed step).
Decoding with a KV cache computes the same slots against the same keys as one exact forward,
so the inference cost per token is the exact forward's cost averaged over T tokens (for the
interleaved layout that is one pass at its fixed point, not the Jacobi iterations of training).

`step_shares[k]` (k = 0..K) is the fraction of tokens whose step k is computed: None = all
(fixed K). This is what runs: a pass packs exactly its live tokens across the micro-batch
(model/engine.py), with no padding rows in any linear layer or LM head, and no bucket rounding.
The one padding is attention's per-sequence layout of the packed queries (widest live count per
sequence): a padding query sees k+1 keys against (k+1)(T+1)/2 for a real one and is not
counted (`benchmarks/train_throughput.py` checks the count against FlopCounterMode:
`counted_vs_logged_flops`, docs/benchmarks.md). Adaptive training counts what the schedule computed, adaptive inference what the
halting rule executed; the router gate after step k (k < K) (with the entropy router also its
forward-only LM head on step k) and, in training, the
correctness-aware penalty's forward-only LM head on step k are counted for the same share (times
`halting_penalty_fraction`, the share of those tokens the penalty samples; its rounding up to
a whole token per step and micro-batch is not counted).
"""

from __future__ import annotations

from megatron_lcot.model.config import LcotConfig


def _attention_width(config: LcotConfig) -> int:
    """heads x head_dim of the queries (= h for the usual kv_channels = h / heads)."""
    return config.num_attention_heads * config.kv_channels


def layer_matmul_flops(config: LcotConfig) -> float:
    """Forward FLOPs of one slot through one decoder layer's linear layers."""
    h, d = config.hidden_size, _attention_width(config)
    kv = 2 * config.num_query_groups * config.kv_channels
    mlp_in = config.ffn_hidden_size * (2 if config.gated_linear_unit else 1)
    return 2.0 * (h * (d + kv) + d * h + h * mlp_in + config.ffn_hidden_size * h)


def attention_flops(config: LcotConfig, keys: float) -> float:
    """Forward FLOPs of one query attending `keys` keys in one layer (QK^T and AV)."""
    return 4.0 * _attention_width(config) * keys


def head_flops(config: LcotConfig, vocab_size: int) -> float:
    """Forward FLOPs of the LM head for one token."""
    return 2.0 * config.hidden_size * vocab_size


def causal_pass_flops(config: LcotConfig, seq_length: int, slots_per_token: int) -> float:
    """Forward FLOPs per token of one decoder pass over `slots_per_token` slots of each of
    `seq_length` tokens under a plain causal mask (vanilla, interleaved)."""
    n = slots_per_token
    keys_per_token = n * (n * seq_length + 1) / 2
    return config.num_layers * (n * layer_matmul_flops(config) + attention_flops(config, keys_per_token))


def stepwise_step_flops(config: LcotConfig, seq_length: int, step: int) -> float:
    """Forward FLOPs of computing step `step` of one token in the stepwise layout."""
    keys = (step + 1) * (seq_length + 1) / 2
    return config.num_layers * (layer_matmul_flops(config) + attention_flops(config, keys))


def _shares(config: LcotConfig, step_shares) -> list:
    steps = config.latent_steps
    if step_shares is None:
        return [1.0] * (steps + 1)
    shares = [float(s) for s in step_shares]
    if len(shares) != steps + 1:
        raise ValueError(f"step_shares needs latent_steps + 1 = {steps + 1} entries, got {len(shares)}")
    return shares


def _stepwise_forward(config: LcotConfig, seq_length: int, vocab_size: int, shares: list) -> tuple:
    """Forward FLOPs per token: (in the autograd graph, forward-only in training and decoding
    (the entropy router's LM head), forward-only in training alone (the penalty's LM head))."""
    graph = head_flops(config, vocab_size)
    graph += sum(share * stepwise_step_flops(config, seq_length, k) for k, share in enumerate(shares))
    router_head, penalty_head = 0.0, 0.0
    if config.adaptive:
        gated = sum(shares[:-1])
        graph += gated * 2.0 * config.hidden_size  # router gates
        penalty_head = gated * config.halting_penalty_fraction * head_flops(config, vocab_size)
        if config.halting_router == "entropy":
            router_head = gated * head_flops(config, vocab_size)
    return graph, router_head, penalty_head


def training_flops_per_token(
    config: LcotConfig, seq_length: int, vocab_size: int, step_shares=None, jacobi_iters: float | None = None
) -> float:
    """Forward + backward FLOPs of one training token (sequences of `seq_length` tokens).

    Interleaved: warm-up passes k = 1..K over k slots per token, J Jacobi passes and a final
    pass over K+1 slots, all in the graph; J defaults to the mean of `config.jacobi_iters`.
    Stepwise (fixed or adaptive) and vanilla: the computed steps (`step_shares`).
    """
    if config.latent_steps > 0 and config.latent_layout == "interleaved":
        if jacobi_iters is None:
            jacobi_iters = sum(config.jacobi_iters) / len(config.jacobi_iters)
        steps = config.latent_steps
        forward = sum(causal_pass_flops(config, seq_length, k) for k in range(1, steps + 1))
        forward += (jacobi_iters + 1) * causal_pass_flops(config, seq_length, steps + 1)
        return 3.0 * (forward + head_flops(config, vocab_size))
    graph, router_head, penalty_head = _stepwise_forward(
        config, seq_length, vocab_size, _shares(config, step_shares)
    )
    return 3.0 * graph + router_head + penalty_head


def inference_flops_per_token(
    config: LcotConfig, seq_length: int, vocab_size: int, step_shares=None
) -> float:
    """Forward FLOPs per token of decoding `seq_length` tokens exactly with a KV cache.

    Interleaved: K+1 length-1 passes per token over the interleaved cache. Stepwise: the
    executed steps (`step_shares`: with adaptive halting, the share of tokens running step k).
    """
    if config.latent_steps > 0 and config.latent_layout == "interleaved":
        return causal_pass_flops(config, seq_length, config.latent_steps + 1) + head_flops(config, vocab_size)
    graph, router_head, _ = _stepwise_forward(config, seq_length, vocab_size, _shares(config, step_shares))
    return graph + router_head


def step_shares_from_halted(halted_share: list) -> list:
    """Share of tokens executing step k (k = 0..K) from the share halted after exactly k steps."""
    return [sum(halted_share[k:]) for k in range(len(halted_share))]
