"""Incremental decoding of LcotGPTModel against a LatentKVCache, with per-token halting.

`LatentDecoder(model)(cache, input_ids, valid)` appends new tokens to the cache and returns
their logits and executed latent steps. It runs the model's own modules (embedding, the
megatron-core TransformerBlock, halting router, output layer); only the attention mask differs
(a `CachedPass`), so it computes exactly what the training forward computes:

* stepwise / vanilla: pass k of the new tokens (all of them at once: a prompt is one prefill
  per step), the router's gate after each step, the training rule for halting (a token runs
  step k while its reach r(t,k) >= tau; once stopped, always stopped), KV reuse for halted
  tokens, output = exit-mass mixture of the executed steps (`LatentThoughts.output_states`).
  When no real token runs step k, the pass is skipped and the cache entries are copied.
* interleaved: the K+1 slots of each new token, one length-1 pass each, in order (exact).
"""

from __future__ import annotations

import torch

from megatron_lcot.inference.kv_cache import CachedPass, LatentKVCache
from megatron_lcot.model.latent import LatentThoughts


class LatentDecoder:
    """Decodes new tokens of a batch of sequences; see the module docstring."""

    def __init__(self, model) -> None:
        self.model = model
        self.config = model.config
        self.interleaved = model.config.latent_steps > 0 and model.config.latent_layout == "interleaved"

    def positions(self, cache: LatentKVCache, valid: torch.Tensor) -> torch.Tensor:
        """[b, n] RoPE positions of new tokens: the count of real tokens before each one."""
        before = cache.real_tokens(0)
        if before is not None and self.interleaved:
            before = before // (self.config.latent_steps + 1)
        start = 0 if before is None else before[:, None]
        return (start + valid.long().cumsum(-1) - 1).clamp(min=0)

    def rotary(self, positions: torch.Tensor) -> torch.Tensor:
        """[n, b, 1, dim]: megatron's own RoPE table at each token's position."""
        table = self.model.rotary_pos_emb(int(positions.max()) + 1)  # [P, 1, 1, dim]
        return table[:, 0][positions.transpose(0, 1).to(table.device)]

    @torch.no_grad()
    def __call__(self, cache: LatentKVCache, input_ids: torch.Tensor, valid: torch.Tensor | None = None):
        """input_ids, valid [b, n] -> (logits [b, n, padded vocab], latent steps [b, n])."""
        if valid is None:
            valid = torch.ones_like(input_ids, dtype=torch.bool)
        valid = valid.bool()
        positions = self.positions(cache, valid)
        embeds = self.model.embedding(input_ids=input_ids, position_ids=positions) * self.config.embedding_scale
        rotary = self.rotary(positions)
        if self.interleaved:
            outputs, steps = self._interleaved(cache, embeds, valid, rotary)
        else:
            outputs, steps = self._stepwise(cache, embeds, valid, rotary)
        logits, _ = self.model.output_layer(outputs)
        return logits.transpose(0, 1), steps.transpose(0, 1)

    def _run(self, inputs, mask, rotary):
        return self.model.decoder(hidden_states=inputs, attention_mask=mask, rotary_pos_emb=rotary)

    def _stepwise(self, cache, embeds, valid, rotary):
        n = embeds.shape[0]
        real = valid.transpose(0, 1)  # [n, b]
        states = [self._run(embeds, CachedPass(cache, 0, valid, 1), rotary)]
        everyone = torch.ones_like(real)
        reach, executed = [everyone.to(embeds.dtype)], [everyone]
        for step in range(1, self.config.latent_steps + 1):
            reach.append(reach[-1] * self.model.halting_router(states[-1], step - 1))
            executing = executed[-1] & (reach[-1] >= self.config.halting_threshold)
            if not (executing & real).any():
                for rest in range(step, self.config.latent_steps + 1):
                    cache.reuse_previous_step(rest, n)
                break
            executed.append(executing)
            mask = CachedPass(cache, step, valid, step + 1, executing)
            states.append(self._run(states[-1], mask, rotary))
        thoughts = LatentThoughts(states, torch.stack(reach), torch.stack(executed))
        return thoughts.output_states(), thoughts.latent_steps()

    def _interleaved(self, cache, embeds, valid, rotary):
        outputs = []
        for i in range(embeds.shape[0]):
            state = embeds[i : i + 1]
            for _ in range(self.config.latent_steps + 1):
                state = self._run(state, CachedPass(cache, 0, valid[:, i : i + 1], 1), rotary[i : i + 1])
            outputs.append(state)
        steps = embeds.new_full(embeds.shape[:2], float(self.config.latent_steps))
        return torch.cat(outputs), steps
