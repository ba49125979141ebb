"""Hugging Face model of a latent-thought Llama (shipped inside every latent export).

Self-contained: imports torch and `transformers` only, so an exported directory loads with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` where neither megatron_lcot
nor megatron-core is installed. Weight names are Llama's (`model.layers.N.self_attn.q_proj`, ...)
plus `model.router.{weight,bias}` for adaptive halting, so the adapter is the same for every mode.

The forward is an independent re-statement of docs/method.md (it shares no code with the training
model, which is what the export tests compare against):

* every slot of token t sits at RoPE position t; token slots are the embeddings times
  `embedding_scale`; a latent slot's input is the previous step's final-normed output;
* stepwise: K+1 passes, pass k attends steps 0..k of tokens <= t; adaptive halting gates each
  step with the router (reach r(t,k+1) = r(t,k) g(t,k)), a token stops once r < tau, exposes its
  last executed step's keys/values to later passes (KV reuse) and its output is the exit-mass
  mixture of its executed steps;
* interleaved: causal attention over x1 z11..z1K x2 ..., solved by Jacobi iterations
  (`jacobi_eval_iters`, as training evaluates); `generate()` iterates to the exact fixed point.

Padding (left or right) is given by `attention_mask` [b, s] (1 = real token); position ids
default to the count of real tokens before each one. `generate()` recomputes the whole sequence
at every step (no cache): exact, and simple enough to audit.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_lcot import LcotLlamaConfig


@dataclass
class LcotCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast + latent_steps [b, s]: executed latent steps per token."""

    latent_steps: torch.FloatTensor | None = None


def rotary_cos_sin(positions, head_dim, theta):
    """positions [b, n] -> cos, sin [b, 1, n, head_dim] (rotate-half convention)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rotary(x, cos, sin):
    """x [b, heads, n, d] rotated by its positions' angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class LcotRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class LcotAttention(nn.Module):
    """Llama attention whose keys/values pass through `expose` (the pass's KV store)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def forward(self, x, cos, sin, expose, mask):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = expose(self.layer_idx, k, v)
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class LcotMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LcotDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = LcotRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LcotAttention(config, layer_idx)
        self.post_attention_layernorm = LcotRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LcotMLP(config)

    def forward(self, x, cos, sin, expose, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, expose, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LcotRouter(nn.Module):
    """g(t,k) = sigmoid(w_k . y(t,k) + b_k): probability that token t runs step k+1."""

    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.latent_steps, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.latent_steps))

    def forward(self, state, step):
        return torch.sigmoid(state @ self.weight[step] + self.bias[step])


def exit_mass(reach, executed):
    """reach, executed [n, b, s] -> [n, b, s] weight of each executed step (sums to 1 over n):
    r(k) - r(k+1) while step k+1 runs, the whole remaining reach at the last executed step."""
    runs_next = torch.cat([executed[1:], torch.zeros_like(executed[:1])])
    next_reach = torch.cat([reach[1:], torch.zeros_like(reach[:1])])
    return torch.where(runs_next, reach - next_reach, torch.where(executed, reach, torch.zeros_like(reach)))


def attention_mask_of(causal, key_valid):
    """[b, 1, n, m] bool (True = attend): `causal` [n, m] and real keys; a query that would see no
    key (left padding) sees itself, so padded rows stay finite."""
    allowed = causal[None] & key_valid[:, None, :]
    n, m = causal.shape
    eye = torch.zeros(n, m, dtype=torch.bool, device=causal.device)
    eye[:, m - n:] = torch.eye(n, dtype=torch.bool, device=causal.device)
    return (allowed | (eye[None] & ~allowed.any(-1, keepdim=True)))[:, None]


class LcotPreTrainedModel(PreTrainedModel):
    config_class = LcotLlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["LcotDecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, LcotRMSNorm):
            nn.init.ones_(module.weight)


class LcotLlamaModel(LcotPreTrainedModel):
    """Embeddings, decoder layers, final norm and the router; `forward` returns the token outputs."""

    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LcotDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LcotRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.router = LcotRouter(config) if config.halting == "adaptive" else None
        self.post_init()

    def decode(self, x, positions, expose, mask):
        """One pass of the decoder stack: x [b, n, h] -> final-normed [b, n, h]."""
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_parameters["rope_theta"])
        for layer in self.layers:
            x = layer(x, cos, sin, expose, mask)
        return self.norm(x)

    def stepwise(self, embeds, positions, key_valid):
        """K+1 passes with halting and KV reuse -> (outputs [b, s, h], latent steps [b, s])."""
        b, s, _ = embeds.shape
        causal = torch.ones(s, s, dtype=torch.bool, device=embeds.device).tril()
        keys, values = {}, {}

        def run(step, inputs, executing):
            def expose(layer, k, v):
                ks, vs = keys.setdefault(layer, []), values.setdefault(layer, [])
                if executing is not None:
                    k = torch.where(executing[:, None, :, None], k, ks[-1])
                    v = torch.where(executing[:, None, :, None], v, vs[-1])
                ks.append(k)
                vs.append(v)
                return torch.cat(ks, dim=2), torch.cat(vs, dim=2)

            mask = attention_mask_of(causal.repeat(1, step + 1), key_valid.repeat(1, step + 1))
            return self.decode(inputs, positions, expose, mask)

        states = [run(0, embeds, None)]
        everyone = torch.ones(b, s, dtype=torch.bool, device=embeds.device)
        reach, executed = [everyone.to(embeds.dtype)], [everyone]
        for step in range(1, self.config.latent_steps + 1):
            gate = self.router(states[-1], step - 1) if self.router is not None else torch.ones_like(reach[-1])
            reach.append(reach[-1] * gate)
            executing = executed[-1] & (reach[-1] >= self.config.halting_threshold)
            if not executing.any():
                break
            executed.append(executing)
            states.append(run(step, states[-1], executing))
        executed = torch.stack(executed)
        weights = exit_mass(torch.stack(reach[: len(states)]), executed)
        outputs = (weights.unsqueeze(-1).to(embeds.dtype) * torch.stack(states)).sum(0)
        return outputs, executed[1:].sum(0).float()

    def interleaved(self, embeds, positions, key_valid, iterations):
        """Jacobi passes over x1 z11..z1K x2 ... -> (outputs [b, s, h], latent steps [b, s]).
        iterations None: until the slots stop changing (the exact sequential result)."""
        b, s, h = embeds.shape

        def run(slots):
            m = slots.shape[2]
            causal = torch.ones(s * m, s * m, dtype=torch.bool, device=embeds.device).tril()
            mask = attention_mask_of(causal, key_valid.repeat_interleave(m, dim=1))
            out = self.decode(slots.reshape(b, s * m, h), positions.repeat_interleave(m, dim=1),
                              lambda layer, k, v: (k, v), mask)
            return out.view(b, s, m, h)

        slots = embeds[:, :, None]
        for _ in range(self.config.latent_steps):
            slots = torch.cat([slots, run(slots)[:, :, -1:]], dim=2)
        limit = s * (self.config.latent_steps + 1) if iterations is None else iterations
        for _ in range(limit):
            updated = torch.cat([slots[:, :, :1], run(slots)[:, :, :-1]], dim=2)
            converged = iterations is None and torch.equal(updated, slots)
            slots = updated
            if converged:
                break
        steps = embeds.new_full((b, s), float(self.config.latent_steps))
        return run(slots)[:, :, -1], steps

    def forward(self, input_ids, attention_mask=None, position_ids=None, jacobi_iters="config"):
        key_valid = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).bool()
        if position_ids is None:
            position_ids = (key_valid.long().cumsum(-1) - 1).clamp(min=0)
        embeds = self.embed_tokens(input_ids) * self.config.embedding_scale
        if self.config.latent_layout == "interleaved":
            iterations = self.config.jacobi_eval_iters if jacobi_iters == "config" else jacobi_iters
            return self.interleaved(embeds, position_ids, key_valid, iterations)
        return self.stepwise(embeds, position_ids, key_valid)


class LcotForCausalLM(LcotPreTrainedModel, GenerationMixin):
    """Latent-thought Llama with an (untied) LM head; logits over the real vocabulary."""

    def __init__(self, config):
        super().__init__(config)
        self.model = LcotLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, jacobi_iters="config",
                **kwargs):
        """input_ids [b, s] -> LcotCausalLMOutput(logits [b, s, vocab], loss, latent_steps [b, s]).
        jacobi_iters (interleaved only): "config" = `jacobi_eval_iters`, None = exact."""
        hidden, latent_steps = self.model(input_ids, attention_mask, position_ids, jacobi_iters)
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return LcotCausalLMOutput(loss=loss, logits=logits, latent_steps=latent_steps)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """Every generation step recomputes the whole sequence (no cache), exactly."""
        return {"input_ids": input_ids, "attention_mask": attention_mask, "jacobi_iters": None}
