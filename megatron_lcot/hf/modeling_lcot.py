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
* interleaved: causal attention over x1 z11..z1K x2 ..., solved over a whole sequence by Jacobi
  iterations (`jacobi_eval_iters`, as training evaluates), or slot after slot with the cache.

The cache (`LcotLatentCache`, a transformers `Cache`) holds, per layer and per latent step k,
the keys/values of slot (t, k) of every token seen: in both layouts slot (t, k) attends slot
(t', k') iff t' < t, or t' = t and k' <= k (stepwise adds k' <= k for t' < t too). A halted
token's entries at steps beyond its last are that step's (KV reuse), as in training. With it,
`generate(use_cache=True)` (the default) prefills the prompt once and then runs only the new
token's slots per step: one pass per executed step (stepwise), K+1 one-slot passes
(interleaved: the exact sequential semantics, also for the prompt). `use_cache=False`
recomputes the whole sequence at every step (interleaved: Jacobi to its exact fixed point).

Padding (left or right) is given by `attention_mask` [b, s] (1 = real token; with a cache it
may cover the cached tokens too, as `generate` passes it); position ids default to the count of
real tokens before each one.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_lcot import LcotLlamaConfig


@dataclass
class LcotCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast + latent_steps [b, s]: executed latent steps per token."""

    latent_steps: torch.FloatTensor | None = None


def rotary_cos_sin(positions, head_dim, theta):
    """positions [b, n] -> cos, sin [b, 1, n, head_dim] (rotate-half convention)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    )
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


class LcotLatentLayer(CacheLayerMixin):
    """One decoder layer's cache: per latent step k, keys and values [b, kv_heads, tokens, head_dim]
    of slot (t, k) of every token seen (Huginn's and Mixture-of-Recursions' caches likewise key
    their entries by recurrence step)."""

    is_compileable = False
    is_croppable = False

    def __init__(self):
        super().__init__()
        self.step_keys, self.step_values = [], []

    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, step=0):
        """Append the new slots' keys/values [b, kv_heads, n, head_dim] to step `step`."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if step == len(self.step_keys):
            self.step_keys.append(key_states)
            self.step_values.append(value_states)
        else:
            self.step_keys[step] = torch.cat([self.step_keys[step], key_states], dim=2)
            self.step_values[step] = torch.cat([self.step_values[step], value_states], dim=2)
        return self.step_keys[step], self.step_values[step]

    def visible(self, steps):
        """Keys, values of steps 0..steps-1, one after the other on the token axis."""
        return torch.cat(self.step_keys[:steps], dim=2), torch.cat(self.step_values[:steps], dim=2)

    def get_seq_length(self):
        return self.step_keys[0].shape[2] if self.step_keys else 0

    def get_mask_sizes(self, query_length):
        return self.get_seq_length() + query_length, 0

    def get_max_length(self):
        return -1

    def reset(self):
        self.step_keys, self.step_values = [], []
        self.is_initialized = False

    def _map(self, function):
        self.step_keys = [function(k) for k in self.step_keys]
        self.step_values = [function(v) for v in self.step_values]

    def reorder_cache(self, beam_idx):
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats):
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        self._map(lambda t: t[indices])


class LcotLatentCache(Cache):
    """The latent KV cache of `LcotForCausalLM`: an `LcotLatentLayer` per decoder layer, and
    `real` [b, tokens] bool, which cached tokens are real (not padding), for masks and positions.

    `generate()` builds one by itself; to keep one across calls, pass
    `cache=LcotLatentCache(model.config)` to `generate` or `forward`.
    """

    def __init__(self, config):
        super().__init__(layers=[LcotLatentLayer() for _ in range(config.num_hidden_layers)])
        self.real = None

    def get_seq_length(self, layer_idx=0):
        """Tokens seen (each with its K+1 slots)."""
        return 0 if self.real is None else self.real.shape[1]

    def add_tokens(self, real):
        """Record n new tokens (real [b, n] bool) -> their RoPE positions [b, n]: the count of real
        tokens before each one."""
        before = 0 if self.real is None else self.real.sum(-1, keepdim=True)
        self.real = real if self.real is None else torch.cat([self.real, real], dim=1)
        return (before + real.long().cumsum(-1) - 1).clamp(min=0)

    def reuse_previous_step(self, step, n):
        """No new token runs `step`: the last n entries of step-1 become step's, in every layer."""
        for layer in self.layers:
            layer.update(layer.step_keys[step - 1][:, :, -n:], layer.step_values[step - 1][:, :, -n:], step)

    def reset(self):
        super().reset()
        self.real = None

    def _map_real(self, function):
        self.real = None if self.real is None else function(self.real)

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        self._map_real(lambda real: real.index_select(0, beam_idx.to(real.device)))

    def batch_repeat_interleave(self, repeats):
        super().batch_repeat_interleave(repeats)
        self._map_real(lambda real: real.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self._map_real(lambda real: real[indices])


def exit_mass(reach, executed):
    """reach, executed [n, b, s] -> [n, b, s] weight of each executed step (sums to 1 over n):
    r(k) - r(k+1) while step k+1 runs, the whole remaining reach at the last executed step."""
    runs_next = torch.cat([executed[1:], torch.zeros_like(executed[:1])])
    next_reach = torch.cat([reach[1:], torch.zeros_like(reach[:1])])
    return torch.where(runs_next, reach - next_reach, torch.where(executed, reach, torch.zeros_like(reach)))


def attention_mask_of(real, lengths, own_step, query_at):
    """[b, 1, n, sum(lengths)] bool (True = attend) for queries at token indices `query_at` [n]
    of step `own_step`, keys = the first lengths[k] tokens of each step k, one after the other.
    A key is seen if it is a real token (`real` [b, tokens]) at or before the query's; a query
    that would see none (left padding) sees its own slot, so padded rows stay finite."""
    allowed, own = [], []
    for step, length in enumerate(lengths):
        at = torch.arange(length, device=real.device)
        allowed.append((at[None, :] <= query_at[:, None])[None] & real[:, None, :length])
        own.append((at[None, :] == query_at[:, None]) & (step == own_step))
    allowed, own = torch.cat(allowed, dim=-1), torch.cat(own, dim=-1)
    return (allowed | (own[None] & ~allowed.any(-1, keepdim=True)))[:, None]


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

    def stepwise(self, embeds, positions, cache):
        """K+1 passes of the n new tokens (the last n in `cache`) with halting and KV reuse ->
        (outputs [b, n, h], latent steps [b, n])."""
        b, n, _ = embeds.shape
        real, tokens = cache.real[:, -n:], cache.get_seq_length()
        query_at = torch.arange(tokens - n, tokens, device=embeds.device)

        def run(step, inputs, executing):
            def expose(layer_idx, k, v):
                layer = cache.layers[layer_idx]
                if executing is not None:  # halted tokens show their last executed step (KV reuse)
                    k = torch.where(executing[:, None, :, None], k, layer.step_keys[step - 1][:, :, -n:])
                    v = torch.where(executing[:, None, :, None], v, layer.step_values[step - 1][:, :, -n:])
                layer.update(k, v, step)
                return layer.visible(step + 1)

            mask = attention_mask_of(cache.real, [tokens] * (step + 1), step, query_at)
            return self.decode(inputs, positions, expose, mask)

        states = [run(0, embeds, None)]
        everyone = torch.ones(b, n, dtype=torch.bool, device=embeds.device)
        reach, executed = [everyone.to(embeds.dtype)], [everyone]
        for step in range(1, self.config.latent_steps + 1):
            gate = (
                self.router(states[-1], step - 1) if self.router is not None else torch.ones_like(reach[-1])
            )
            reach.append(reach[-1] * gate)
            executing = executed[-1] & (reach[-1] >= self.config.halting_threshold)
            if not (executing & real).any():
                for skipped in range(step, self.config.latent_steps + 1):
                    cache.reuse_previous_step(skipped, n)
                break
            executed.append(executing)
            states.append(run(step, states[-1], executing))
        executed = torch.stack(executed)
        weights = exit_mass(torch.stack(reach[: len(states)]), executed)
        outputs = (weights.unsqueeze(-1).to(embeds.dtype) * torch.stack(states)).sum(0)
        return outputs, executed[1:].sum(0).float()

    def interleaved(self, embeds, positions, real, iterations):
        """Jacobi passes over x1 z11..z1K x2 ... -> (outputs [b, s, h], latent steps [b, s]).
        iterations None: until the slots stop changing (the exact sequential result)."""
        b, s, h = embeds.shape

        def run(slots):
            m = slots.shape[2]
            mask = attention_mask_of(
                real.repeat_interleave(m, dim=1), [s * m], 0, torch.arange(s * m, device=embeds.device)
            )
            out = self.decode(
                slots.reshape(b, s * m, h),
                positions.repeat_interleave(m, dim=1),
                lambda layer, k, v: (k, v),
                mask,
            )
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

    def interleaved_cached(self, embeds, positions, cache):
        """The n new tokens (the last n in `cache`) slot after slot: K+1 one-slot passes per token,
        slot k of token t attending every slot of earlier tokens and slots 0..k of its own (the
        sequential semantics exactly) -> (outputs [b, n, h], latent steps [b, n])."""
        n, slots, tokens = embeds.shape[1], self.config.latent_steps + 1, cache.get_seq_length()
        outputs = []
        for i in range(n):
            at = tokens - n + i
            state = embeds[:, i : i + 1]
            for slot in range(slots):

                def expose(layer_idx, k, v, slot=slot):
                    cache.layers[layer_idx].update(k, v, slot)
                    return cache.layers[layer_idx].visible(slots)

                lengths = [at + 1] * (slot + 1) + [at] * (slots - slot - 1)
                mask = attention_mask_of(cache.real, lengths, slot, torch.tensor([at], device=embeds.device))
                state = self.decode(state, positions[:, i : i + 1], expose, mask)
            outputs.append(state)
        return torch.cat(outputs, dim=1), embeds.new_full(embeds.shape[:2], float(self.config.latent_steps))

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, jacobi_iters="config"):
        """input_ids [b, n] (the tokens `cache` has not seen) -> (outputs [b, n, h], latent steps
        [b, n]). attention_mask [b, n] or [b, cached + n]. Without a cache: the whole sequence
        (interleaved: `jacobi_iters` Jacobi passes, "config" = `jacobi_eval_iters`, None = exact)."""
        n = input_ids.shape[1]
        if attention_mask is None:
            real = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            real = attention_mask[:, -n:].bool()
        interleaved = self.config.latent_layout == "interleaved"
        if cache is None and interleaved:
            if position_ids is None:
                position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)
            embeds = self.embed_tokens(input_ids) * self.config.embedding_scale
            iterations = self.config.jacobi_eval_iters if jacobi_iters == "config" else jacobi_iters
            return self.interleaved(embeds, position_ids, real, iterations)
        cache = LcotLatentCache(self.config) if cache is None else cache
        positions = cache.add_tokens(real)
        position_ids = positions if position_ids is None else position_ids
        embeds = self.embed_tokens(input_ids) * self.config.embedding_scale
        if interleaved:
            return self.interleaved_cached(embeds, position_ids, cache)
        return self.stepwise(embeds, position_ids, cache)


class LcotForCausalLM(LcotPreTrainedModel, GenerationMixin):
    """Latent-thought Llama with an (untied) LM head; logits over the real vocabulary."""

    def __init__(self, config):
        super().__init__(config)
        self.model = LcotLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        use_cache=None,
        labels=None,
        jacobi_iters="config",
        **kwargs,
    ):
        """input_ids [b, n] -> LcotCausalLMOutput(logits [b, n, vocab], loss, latent_steps [b, n],
        cache). With `cache` (or use_cache=True, which starts one) input_ids are the tokens it has
        not seen, and it is returned holding them too. jacobi_iters (interleaved, no cache):
        "config" = `jacobi_eval_iters`, None = exact."""
        if "past_key_values" in kwargs:
            raise TypeError(
                "past_key_values: transformers now names it cache; pass cache=... (an LcotLatentCache)."
            )
        if cache is None and use_cache:
            cache = LcotLatentCache(self.config)
        hidden, latent_steps = self.model(input_ids, attention_mask, position_ids, cache, jacobi_iters)
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return LcotCausalLMOutput(loss=loss, logits=logits, latent_steps=latent_steps, cache=cache)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() starts an LcotLatentCache where transformers would start a DynamicCache."""
        given = model_kwargs.get("cache")
        if given is not None and not isinstance(given, LcotLatentCache):
            raise ValueError(
                f"cache={type(given).__name__}: this model caches every latent step; pass "
                "cache=LcotLatentCache(model.config) or no cache."
            )
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r}: this model "
                "has only its own dynamic latent cache; leave cache_implementation unset."
            )
        if given is None and generation_config.use_cache:
            model_kwargs["cache"] = LcotLatentCache(self.config)
        else:
            super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, **kwargs):
        """With a cache, only the tokens it has not seen (after the prefill: the last one); without,
        the whole sequence, the interleaved layout's Jacobi run to its exact fixed point."""
        if cache is not None:
            input_ids = input_ids[:, cache.get_seq_length() :]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "cache": cache,
            "jacobi_iters": None,
        }
