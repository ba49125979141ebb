"""Naive, independent references for the latent-thought LM (docs/method.md).

Everything here is written with plain torch ops from the *weights* of a megatron-core
GPTModel (local spec, RMSNorm, SwiGLU, RoPE, untied, GQA). Nothing in this file imports or
calls megatron_lcot's schedules, attention, masking, rotary or halting code: these functions
are the yardstick that code is judged by, so they must be obviously correct rather than fast.

Conventions (verified against megatron-core 0.16.1 source, and by
tests/unit/test_equivalence_reference.py against megatron-core's own GPTModel):

* RMSNorm: x * rsqrt(mean(x^2) + eps) * w, eps = config.layernorm_epsilon.
* Fused QKV (`linear_qkv.weight`, [ng * (np/ng + 2) * hd, h]): per query group, the rows are
  [q_1 .. q_{np/ng}, k, v] blocks of hd rows each (attention.py get_query_key_value_tensors).
  Query head i belongs to kv group i // (np/ng).
* RoPE: rotate-half (non-interleaved) convention, inv_freq = base^(-2j/hd), angle = pos * inv_freq,
  cos/sin of cat(angle, angle); x * cos + cat(-x2, x1) * sin. Applied to q and k at an *explicit*
  position (every slot of token t uses position t).
* Attention: softmax(q.k / sqrt(hd)) over the visible keys, heads concatenated in head order,
  then `linear_proj`; residual; pre-MLP RMSNorm; `linear_fc1` = [gate; up], silu(gate) * up;
  `linear_fc2`; residual.
* Final norm `decoder.final_layernorm`; head `output_layer.weight` (untied).

Slots: slot (t, k) is token t at step k (k = 0 the token, k >= 1 its latent thoughts). The input
of (t, 0) is word_embeddings[token] * embedding_scale; the input of (t, k >= 1) is the final-normed
output of (t, k - 1). The reference decoders run one slot at a time with an explicit per-layer
KV cache keyed by slot id, so "which keys does this query see" is a plain Python list.

All references loop over the batch (each sequence on its own, b = 1 inside) so that adaptive
halting, which differs per sequence, needs no special casing. They are differentiable: gradients
of their outputs reach the model's parameters through autograd.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Slot = Hashable  # (t, k) tuples


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [h]
    qkv: torch.Tensor  # [ng * (np/ng + 2) * hd, h]
    proj: torch.Tensor  # [h, np * hd]
    pre_mlp_norm: torch.Tensor  # [h]
    fc1: torch.Tensor  # [2 * ffn, h] = [gate; up]
    fc2: torch.Tensor  # [h, ffn]


@dataclass
class NaiveWeights:
    """The model's parameters (the live tensors, so autograd reaches them) plus the shape facts."""

    word_embeddings: torch.Tensor  # [V, h]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [h]
    output: torch.Tensor  # [V, h]
    eps: float
    num_heads: int
    num_groups: int
    head_dim: int
    rotary_base: float = 10000.0
    router_weight: torch.Tensor | None = None  # [K, h]
    router_bias: torch.Tensor | None = None  # [K]
    router_entropy_weight: torch.Tensor | None = None  # [K], the entropy router's
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> NaiveWeights:
        """Read the weights by their megatron-core GPTModel names (local spec)."""
        params = dict(model.named_parameters())
        cfg = model.config
        layers = []
        i = 0
        while f"decoder.layers.{i}.input_layernorm.weight" in params:
            p = f"decoder.layers.{i}."
            layers.append(
                LayerWeights(
                    input_norm=params[p + "input_layernorm.weight"],
                    qkv=params[p + "self_attention.linear_qkv.weight"],
                    proj=params[p + "self_attention.linear_proj.weight"],
                    pre_mlp_norm=params[p + "pre_mlp_layernorm.weight"],
                    fc1=params[p + "mlp.linear_fc1.weight"],
                    fc2=params[p + "mlp.linear_fc2.weight"],
                )
            )
            i += 1
        assert len(layers) == cfg.num_layers, (len(layers), cfg.num_layers)
        num_groups = cfg.num_query_groups or cfg.num_attention_heads
        head_dim = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            word_embeddings=params["embedding.word_embeddings.weight"],
            layers=layers,
            final_norm=params["decoder.final_layernorm.weight"],
            output=params["output_layer.weight"],
            eps=cfg.layernorm_epsilon,
            num_heads=cfg.num_attention_heads,
            num_groups=num_groups,
            head_dim=head_dim,
            rotary_base=float(getattr(cfg, "rotary_base", None) or 10000.0),
            router_weight=params.get("halting_router.weight"),
            router_bias=params.get("halting_router.bias"),
            router_entropy_weight=params.get("halting_router.entropy_weight"),
        )


# ----------------------------------------------------------------------------------------------
# Building blocks (one vector at a time)
# ----------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, pos, base: float) -> torch.Tensor:
    """Rotate-half RoPE of x [..., hd] at position `pos`: an int (the same for all of x), or a
    tensor of positions broadcasting against x's leading dims (e.g. [N, 1] for x [N, heads, hd])."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    angle = (torch.as_tensor(pos, dtype=torch.float32)[..., None] * inv_freq).to(x.dtype)
    angle = torch.cat([angle, angle], dim=-1)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * torch.cos(angle) + rotated * torch.sin(angle)


def split_qkv(w: NaiveWeights, qkv_out: torch.Tensor):
    """[ng * (npg + 2) * hd] -> q [np, hd], k [ng, hd], v [ng, hd] (megatron's per-group layout)."""
    npg = w.num_heads // w.num_groups
    hd = w.head_dim
    per_group = qkv_out.view(w.num_groups, (npg + 2) * hd)
    q = per_group[:, : npg * hd].reshape(w.num_heads, hd)
    k = per_group[:, npg * hd : (npg + 1) * hd]
    v = per_group[:, (npg + 1) * hd :]
    return q, k, v


def swiglu_mlp(lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
    gate_up = lw.fc1 @ x
    gate, up = gate_up.chunk(2, dim=-1)
    return lw.fc2 @ (F.silu(gate) * up)


# ----------------------------------------------------------------------------------------------
# The slot-at-a-time decoder with explicit per-layer KV caches
# ----------------------------------------------------------------------------------------------


class SlotDecoder:
    """Runs the decoder stack on one slot (one vector) at a time.

    `cache[layer][slot] = (k [ng, hd] after RoPE, v [ng, hd])`. `run(x, pos, slot, visible)`
    stores the slot's own keys/values in every layer, then attends over exactly the slots in
    `visible` (which must include `slot`). Returns the final-normed output y [h].
    """

    def __init__(self, w: NaiveWeights):
        self.w = w
        self.cache: list[dict[Slot, tuple]] = [dict() for _ in w.layers]

    def run(self, x: torch.Tensor, pos: int, slot: Slot, visible: Sequence[Slot]) -> torch.Tensor:
        w = self.w
        npg = w.num_heads // w.num_groups
        scale = 1.0 / math.sqrt(w.head_dim)
        assert slot in visible
        for layer, lw in enumerate(w.layers):
            q, k, v = split_qkv(w, lw.qkv @ rms_norm(x, lw.input_norm, w.eps))
            q, k = rope(q, pos, w.rotary_base), rope(k, pos, w.rotary_base)
            self.cache[layer][slot] = (k, v)
            keys = torch.stack([self.cache[layer][s][0] for s in visible])  # [n, ng, hd]
            values = torch.stack([self.cache[layer][s][1] for s in visible])
            heads = []
            for i in range(w.num_heads):
                g = i // npg
                probs = torch.softmax((keys[:, g, :] @ q[i]) * scale, dim=0)  # [n]
                heads.append(probs @ values[:, g, :])
            x = x + lw.proj @ torch.cat(heads)
            x = x + swiglu_mlp(lw, rms_norm(x, lw.pre_mlp_norm, w.eps))
        return rms_norm(x, w.final_norm, w.eps)

    def alias(self, slot: Slot, source: Slot) -> None:
        """Make `slot` expose `source`'s keys/values in every layer (KV reuse of a halted step)."""
        for layer_cache in self.cache:
            layer_cache[slot] = layer_cache[source]


def head(w: NaiveWeights, y: torch.Tensor) -> torch.Tensor:
    return y @ w.output.t()


def entropy_term(w: NaiveWeights, y: torch.Tensor, k: int) -> torch.Tensor:
    """The entropy router's addition to gate k's logit: a_k H / log V, H the entropy of the step's
    own prediction under stop-gradient (0 for the linear router)."""
    if w.router_entropy_weight is None:
        return y.new_zeros(())
    log_p = torch.log_softmax(head(w, y).detach().double(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum()
    return w.router_entropy_weight[k] * (entropy / math.log(w.output.shape[0])).to(y.dtype)


def per_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[b, s, V], [b, s] -> [b, s] cross-entropy (no reduction)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none").view(
        labels.shape
    )


def _embed(w: NaiveWeights, token: int, scale: float) -> torch.Tensor:
    return w.word_embeddings[token] * scale


# ----------------------------------------------------------------------------------------------
# Vanilla and fixed-K layouts, token by token
# ----------------------------------------------------------------------------------------------


def vanilla_logits(w: NaiveWeights, tokens: torch.Tensor, embedding_scale: float = 1.0) -> torch.Tensor:
    """Plain causal LM, token by token with a KV cache. tokens [b, T] -> logits [b, T, V]."""
    out = []
    for seq in tokens.tolist():
        dec = SlotDecoder(w)
        ys = []
        for t, tok in enumerate(seq):
            ys.append(dec.run(_embed(w, tok, embedding_scale), t, (t, 0), [(u, 0) for u in range(t + 1)]))
        out.append(head(w, torch.stack(ys)))
    return torch.stack(out)


def stepwise_states(w: NaiveWeights, seq: Sequence[int], K: int, embedding_scale: float):
    """Stepwise layout, fixed K: slot (t,k) sees (t',k') iff t' <= t and k' <= k.

    Runs token by token, and within a token step by step. Returns y [T, K+1, h] (final-normed).
    """
    dec = SlotDecoder(w)
    ys = []
    for t, tok in enumerate(seq):
        x = _embed(w, tok, embedding_scale)
        per_step = []
        for k in range(K + 1):
            visible = [(u, j) for u in range(t + 1) for j in range(k + 1)]
            y = dec.run(x, t, (t, k), visible)
            per_step.append(y)
            x = y
        ys.append(torch.stack(per_step))
    return torch.stack(ys)


def stepwise_logits(w: NaiveWeights, tokens: torch.Tensor, K: int, embedding_scale: float) -> torch.Tensor:
    """Logits of token t = output_layer(y(t, K)). tokens [b, T] -> [b, T, V]."""
    return torch.stack(
        [head(w, stepwise_states(w, seq, K, embedding_scale)[:, K]) for seq in tokens.tolist()]
    )


def interleaved_sequential_logits(
    w: NaiveWeights, tokens: torch.Tensor, K: int, embedding_scale: float
) -> torch.Tensor:
    """Interleaved layout (x1 z11..z1K x2 ...), plain causal, decoded exactly slot by slot.

    This is exact decoding: slot (t,k) sees every slot of tokens < t and (t,k') for k' <= k.
    """
    out = []
    for seq in tokens.tolist():
        dec = SlotDecoder(w)
        order: list[Slot] = []
        ys = []
        for t, tok in enumerate(seq):
            x = _embed(w, tok, embedding_scale)
            for k in range(K + 1):
                order.append((t, k))
                x = dec.run(x, t, (t, k), list(order))
            ys.append(x)  # y(t, K)
        out.append(head(w, torch.stack(ys)))
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------
# Interleaved layout: naive Jacobi loop over the full slot sequence (dense causal mask)
# ----------------------------------------------------------------------------------------------


def dense_decoder(
    w: NaiveWeights, X: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """Full-sequence decoder written plainly. X [N, h], positions [N] (ints),
    allowed [N, N] bool (query i may attend key j). Returns final-normed H [N, h]."""
    N = X.shape[0]
    npg = w.num_heads // w.num_groups
    scale = 1.0 / math.sqrt(w.head_dim)
    x = X
    for lw in w.layers:
        qkv = rms_norm(x, lw.input_norm, w.eps) @ lw.qkv.t()  # [N, ...]
        npg_hd = npg * w.head_dim
        per_group = qkv.view(N, w.num_groups, (npg + 2) * w.head_dim)  # same layout as split_qkv
        q = per_group[:, :, :npg_hd].reshape(N, w.num_heads, w.head_dim)
        k = per_group[:, :, npg_hd : npg_hd + w.head_dim]
        v = per_group[:, :, npg_hd + w.head_dim :]
        q = rope(q, positions[:, None], w.rotary_base)  # [N, np, hd]
        k = rope(k, positions[:, None], w.rotary_base)  # [N, ng, hd]
        heads = []
        for i in range(w.num_heads):
            g = i // npg
            scores = (q[:, i, :] @ k[:, g, :].t()) * scale  # [N, N]
            scores = scores.masked_fill(~allowed, float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ v[:, g, :])
        x = x + torch.cat(heads, dim=-1) @ lw.proj.t()
        h2 = rms_norm(x, lw.pre_mlp_norm, w.eps)
        gate, up = (h2 @ lw.fc1.t()).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ lw.fc2.t()
    return rms_norm(x, w.final_norm, w.eps)


def interleaved_jacobi_logits(
    w: NaiveWeights,
    tokens: torch.Tensor,
    K: int,
    jacobi_iters: int,
    embedding_scale: float,
) -> torch.Tensor:
    """PonderLM-2's Jacobi schedule, written plainly (docs/method.md).

    S[t, 0] = token embedding * scale. Warm-up (the project's documented decision, so that no
    slot is read before it holds a state): for k = 1..K, one pass of M over the interleaved
    sequence of steps 0..k-1 only (T*k slots, causal), then S[t, k] = H[slot (t, k-1)].
    Then `jacobi_iters` times: H = M(interleave(S)) over all T(K+1) slots;
    S[t, k] = H[slot (t, k-1)] for all k >= 1 at once. Finally H = M(interleave(S)),
    logits = head(H[slot (t, K)]). M is `dense_decoder` with a dense causal mask and every
    slot of token t at position t.
    """
    out = []
    for seq in tokens.tolist():
        T = len(seq)
        S = [torch.stack([_embed(w, tok, embedding_scale) for tok in seq])]  # S[k]: [T, h]

        def M(S):
            """interleave S[0..n-1] (x1 z11.. x2 ..), run the causal decoder -> [T, n, h]."""
            n = len(S)
            X = torch.stack(S, dim=1).reshape(T * n, -1)
            positions = torch.arange(T).repeat_interleave(n)
            allowed = torch.ones(T * n, T * n, dtype=torch.bool).tril()
            return dense_decoder(w, X, positions, allowed).view(T, n, -1)

        for k in range(1, K + 1):
            S = S + [M(S)[:, k - 1]]
        for _ in range(jacobi_iters):
            H = M(S)
            S = [S[0]] + [H[:, k - 1] for k in range(1, K + 1)]
        out.append(head(w, M(S)[:, K]))
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------
# Adaptive halting (stepwise layout), token by token
# ----------------------------------------------------------------------------------------------


@dataclass
class AdaptiveResult:
    logits: torch.Tensor  # [b, T, V] from the pruned exit-mass mixture of step states
    loss: torch.Tensor | None  # [b, T] lm_loss + lambda * penalty
    lm_loss: torch.Tensor | None  # [b, T]
    penalty: torch.Tensor | None  # [b, T]
    latent_steps: torch.Tensor  # [b, T] executed steps k >= 1
    expected_latent_steps: torch.Tensor  # [b, T] sum of r(t,k) over executed steps k >= 1
    reach: torch.Tensor  # [b, T, K+1]; NaN where undefined (after the first step below tau)
    live: torch.Tensor  # [b, T, K+1] bool


def adaptive_forward(
    w: NaiveWeights,
    tokens: torch.Tensor,
    K: int,
    threshold: float,
    embedding_scale: float,
    labels: torch.Tensor | None = None,
    loss_weight: float = 0.0,
    correctness_exponent: float = 1.0,
) -> AdaptiveResult:
    """Adaptive latent CoT, decoded naively token by token (docs/method.md, our rules).

    For each token in order, run steps k = 0, 1, ... while live. After step k (k < K), the gate
    g(t,k) = sigmoid(y(t,k) . W[k] + b[k]) (the entropy router adds a_k H(t,k) / log V inside:
    `entropy_term`); reach r(t,k+1) = r(t,k) g(t,k); step k+1 is live iff
    step k is live and r(t,k+1) >= tau. When the token halts at step m, every remaining slot
    (t,k>m) exposes, in every layer, the keys/values of (t,m) to later tokens' queries
    (queries (t',k') with t' > t see (t,k) iff k <= k'). Output mixture: exit masses
    e(t,k) = r(t,k)(1 - g(t,k)) for executed k < m, e(t,m) = r(t,m) (pruned mass moved onto the
    last executed step; for m = K that is the ordinary leftover r(t,K)).

    Loss (labels given): CE(logits, label) + lambda * sum_{k<K, live(t,k)} r(t,k+1) * sg(p(t,k))^beta,
    p(t,k) = softmax(head(y(t,k)))[label].
    """
    assert w.router_weight is not None and w.router_bias is not None, "model has no halting_router"
    batch_logits, batch_pen, batch_steps, batch_exp, batch_reach, batch_live = [], [], [], [], [], []
    for b, seq in enumerate(tokens.tolist()):
        dec = SlotDecoder(w)
        T = len(seq)
        last_live = [0] * T  # last executed step of each token
        logits_t, pen_t, steps_t, exp_t, reach_t, live_t = [], [], [], [], [], []
        for t, tok in enumerate(seq):
            x = _embed(w, tok, embedding_scale)
            r = x.new_ones(())  # r(t,0)
            reach = [r]
            live = [True]
            ys = []
            gates = []
            for k in range(K + 1):
                # slot (t,k) sees (u,j) for u <= t, j <= k; halted tokens' slots are aliased.
                visible = [(u, j) for u in range(t + 1) for j in range(k + 1)]
                y = dec.run(x, t, (t, k), visible)
                ys.append(y)
                if k == K:
                    break
                g = torch.sigmoid(y @ w.router_weight[k] + w.router_bias[k] + entropy_term(w, y, k))
                gates.append(g)
                r = r * g
                reach.append(r)
                if r.item() >= threshold:
                    live.append(True)
                    x = y
                else:
                    break
            m = len(ys) - 1  # last executed step
            last_live[t] = m
            for k in range(m + 1, K + 1):
                dec.alias((t, k), (t, m))
            # exit masses over executed steps, pruned mass moved onto step m
            exits = [reach[k] * (1 - gates[k]) for k in range(m)] + [reach[m]]
            y_out = sum(e * y for e, y in zip(exits, ys))
            logits_t.append(head(w, y_out))
            steps_t.append(m)
            exp_t.append(sum(reach[1 : m + 1], x.new_zeros(())))  # executed latent steps only
            full_reach = torch.full((K + 1,), float("nan"), dtype=x.dtype)
            full_reach[: len(reach)] = torch.stack(reach).detach()
            reach_t.append(full_reach)
            live_t.append(torch.tensor([k <= m for k in range(K + 1)]))
            if labels is not None:
                label = int(labels[b, t])
                pen = x.new_zeros(())
                for k in range(min(m + 1, K)):  # executed steps k < K
                    p = torch.softmax(head(w, ys[k]).detach().float(), dim=-1)[label].to(x.dtype)
                    pen = pen + reach[k + 1] * p.pow(correctness_exponent)
                pen_t.append(pen)
        batch_logits.append(torch.stack(logits_t))
        batch_steps.append(torch.tensor(steps_t))
        batch_exp.append(torch.stack(exp_t))
        batch_reach.append(torch.stack(reach_t))
        batch_live.append(torch.stack(live_t))
        if labels is not None:
            batch_pen.append(torch.stack(pen_t))
    logits = torch.stack(batch_logits)
    lm_loss = penalty = loss = None
    if labels is not None:
        lm_loss = per_token_ce(logits, labels)
        penalty = torch.stack(batch_pen)
        loss = lm_loss + loss_weight * penalty
    return AdaptiveResult(
        logits=logits,
        loss=loss,
        lm_loss=lm_loss,
        penalty=penalty,
        latent_steps=torch.stack(batch_steps),
        expected_latent_steps=torch.stack(batch_exp),
        reach=torch.stack(batch_reach),
        live=torch.stack(batch_live),
    )
