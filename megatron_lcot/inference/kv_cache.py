"""The inference KV cache of latent decoding, and the structured mask that reads and writes it.

The cache holds, for every layer, the rotary-embedded keys/values of every slot decoded so far,
in *streams*:

* stepwise layout (and vanilla, K = 0): stream k holds step k of every token, so pass k of new
  tokens attends streams 0..k up to its own token (docs/method.md: slot (t,k) sees (t',k') iff
  t' <= t and k' <= k). A token that halted before step k writes, in every layer, the entry of
  its last executed step (KV reuse) and computes nothing more;
* interleaved layout: one stream x1 z11..z1K x2 ... (plain causal), written one slot at a time:
  the exact sequential semantics that Jacobi training approximates.

`CachedPass` is the `attention_mask` the model's own TransformerBlock receives for one pass of
new slots (`expose(layer_number, key, value)` / `allowed_keys(device)`, the protocol of
model/attention.py), so decoding runs the real megatron-core layers, one pass at a time.
Padding: each stream keeps which entries are real tokens [b, S]; a padded query that would see
no key attends to itself only, so padded rows stay finite and never reach real ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LatentKVCache:
    """keys[layer_number][stream]: [S, b, ng, hn]; valid[stream]: [b, S] bool (real tokens)."""

    keys: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    valid: dict = field(default_factory=dict)

    def length(self, stream: int = 0) -> int:
        return self.valid[stream].shape[1] if stream in self.valid else 0

    def real_tokens(self, stream: int = 0) -> torch.Tensor | None:
        """[b] real entries in `stream` so far (None when empty)."""
        return self.valid[stream].sum(-1) if stream in self.valid else None

    def append_valid(self, stream: int, new_valid: torch.Tensor) -> None:
        """new_valid [b, n]: the validity of the n entries the next pass writes to `stream`."""
        old = self.valid.get(stream)
        self.valid[stream] = new_valid if old is None else torch.cat([old, new_valid], dim=1)

    def write(self, layer: int, stream: int, key: torch.Tensor, value: torch.Tensor) -> None:
        keys, values = self.keys.setdefault(layer, {}), self.values.setdefault(layer, {})
        keys[stream] = key if stream not in keys else torch.cat([keys[stream], key])
        values[stream] = value if stream not in values else torch.cat([values[stream], value])

    def reuse_previous_step(self, stream: int, num_new: int) -> None:
        """Stepwise, no token executes step `stream`: the last `num_new` entries of stream-1 are
        copied into it in every layer (the halted tokens' KV reuse, at no compute)."""
        self.append_valid(stream, self.valid[stream - 1][:, -num_new:])
        for layer in self.keys:
            self.write(layer, stream, self.keys[layer][stream - 1][-num_new:],
                       self.values[layer][stream - 1][-num_new:])


@dataclass
class CachedPass:
    """The structured `attention_mask` of one pass of `n` new slots written to `stream`.

    Queries are the n new slots; keys are streams 0..stream (stepwise, `streams_seen` =
    stream + 1) or stream 0 alone (interleaved). executing [n, b] bool: new slots that
    compute this step; the others expose their previous step's entry (stepwise KV reuse).
    """

    cache: LatentKVCache
    stream: int
    new_valid: torch.Tensor  # [b, n]
    streams_seen: int
    executing: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.cache.append_valid(self.stream, self.new_valid)

    def expose(self, layer_number: int, key: torch.Tensor, value: torch.Tensor):
        """key/value [n, b, ng, hn] -> keys/values of every visible stream [sum S, b, ng, hn]."""
        cache, n = self.cache, key.shape[0]
        if self.executing is not None:
            executing = self.executing[:, :, None, None]
            key = torch.where(executing, key, cache.keys[layer_number][self.stream - 1][-n:])
            value = torch.where(executing, value, cache.values[layer_number][self.stream - 1][-n:])
        cache.write(layer_number, self.stream, key, value)
        first = self.stream - self.streams_seen + 1
        streams = range(first, self.stream + 1)
        return (torch.cat([cache.keys[layer_number][s] for s in streams]),
                torch.cat([cache.values[layer_number][s] for s in streams]))

    def allowed_keys(self, device) -> torch.Tensor:
        """[b, 1, n, sum S] bool (True = attend): entries up to the query's own slot, real ones."""
        n = self.new_valid.shape[1]
        blocks = []
        for s in range(self.stream - self.streams_seen + 1, self.stream + 1):
            length = self.cache.length(s)
            causal = torch.arange(length, device=device)[None, :] <= torch.arange(length - n, length, device=device)[:, None]
            blocks.append(causal[None] & self.cache.valid[s].to(device)[:, None, :])
        allowed = torch.cat(blocks, dim=-1)  # [b, n, sum S]
        own = torch.zeros_like(allowed)
        own[:, :, -n:] = torch.eye(n, dtype=torch.bool, device=device)
        return (allowed | (own & ~allowed.any(-1, keepdim=True)))[:, None]
