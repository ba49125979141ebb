"""The latent engine: one latent pass, written once, for training, pipeline stages and decoding.

A latent schedule (latent.py) says how many passes a forward makes and what each pass does;
every pass runs here, whoever calls it:

* single-stage training: `schedule(decoder, token_states, rotary, router)` = the prefill of an
  empty `LatentKVStore`;
* pipeline stages (parallel/pipeline_passes.py): pass k is virtual pipeline chunk k, run on each stage's
  share of the layers, the halting decision crossing the stages in the payload;
* cached decoding (inference/decoding.py): the same passes over the new tokens of a batch of
  sequences, appended to a store that persists between calls.

What a pass shares with the others lives in one `LatentRun`: the per-layer KV store (one stream
per latent step), the halting state (model/halting.py: reach, executed steps, the decision and
its tensor-parallel agreement, the exit-mass mixture), the step states and the RoPE table at the
tokens' positions.

Halted tokens cost nothing: a pass in which some tokens do not execute packs the live ones of
the whole micro-batch into one row block `[N, 1, h]` (N = live tokens, no padding: `LivePacking`),
runs the block on it with RoPE at their own positions, and scatters the outputs back onto the
previous step's states; in every layer the store scatters the packed keys/values onto the
previous stream's (KV reuse, one `index_copy`). Only the attention itself lays the packed
queries out per sequence (`[widest, b]`, the widest sequence's live count), because each query
attends its own sequence's keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint

from megatron_lcot.model.attention_pass import AttentionPass
from megatron_lcot.model.halting import HaltingState, LivePacking
from megatron_lcot.model.masking import stepwise_pass_mask


class LatentKVStore:
    """Per layer, one stream per latent step: keys[layer_number][stream] [S, b, ng, hn] (rotary-
    embedded), the same for values.

    Stream k holds step k of every token (stepwise; the interleaved layout's decoding writes its
    slots to stream 0). A call (one training forward, one decoding step) appends `num_new` entries
    to every stream it writes, after `cached` entries of earlier calls. `valid` [b, S] marks real
    entries (None: all real, as in training; decoding's left padding sets it). `tokens_seen` [b]
    counts the real tokens decoded so far (their RoPE positions continue from it).
    """

    def __init__(self) -> None:
        self.keys: dict = {}
        self.values: dict = {}
        self.valid: torch.Tensor | None = None
        self.tokens_seen: torch.Tensor | None = None
        self.cached = 0
        self.num_new = 0

    @property
    def length(self) -> int:
        """Entries per stream once this call has written."""
        return self.cached + self.num_new

    def begin(self, num_new: int, new_valid: torch.Tensor | None = None) -> None:
        """Start a call that writes `num_new` entries per stream (new_valid [b, num_new])."""
        self.cached = self.length
        self.num_new = num_new
        if new_valid is not None:
            self.valid = new_valid if self.valid is None else torch.cat([self.valid, new_valid], dim=1)
        elif self.valid is not None:
            raise ValueError("a store with padded entries needs the validity of every call's entries")

    def write(self, layer_number: int, stream: int, key, value, live: LivePacking | None = None) -> None:
        """This call's entries of `stream` in one layer.

        key/value: [num_new, b, ng, hn] (every new token computed), or with `live` the packed
        rows [N, 1, ng, hn] of the tokens that executed; the others repeat the previous stream's
        entry (KV reuse: one scatter). Writing replaces this call's entries, so a recomputed pass
        (activation checkpointing) overwrites its own.
        """
        for streams, new in (
            (self.keys.setdefault(layer_number, {}), key),
            (self.values.setdefault(layer_number, {}), value),
        ):
            if live is not None:
                new = live.scatter(new, self._new_entries(streams, stream - 1))
            self._set_new_entries(streams, stream, new)

    def reuse(self, stream: int) -> None:
        """No token executes `stream`: every layer's new entries repeat the previous stream's."""
        for streams in (*self.keys.values(), *self.values.values()):
            self._set_new_entries(streams, stream, self._new_entries(streams, stream - 1))

    def _new_entries(self, streams: dict, stream: int) -> torch.Tensor:
        return streams[stream] if self.cached == 0 else streams[stream][self.cached :]

    def _set_new_entries(self, streams: dict, stream: int, new: torch.Tensor) -> None:
        streams[stream] = new if self.cached == 0 else torch.cat([streams[stream][: self.cached], new])

    def read(self, layer_number: int, first: int, last: int) -> tuple:
        """Keys/values of streams first..last, concatenated: [(last - first + 1) S, b, ng, hn]."""
        keys, values = self.keys[layer_number], self.values[layer_number]
        if first == last:
            return keys[last], values[last]
        streams = range(first, last + 1)
        return torch.cat([keys[s] for s in streams]), torch.cat([values[s] for s in streams])

    def next_positions(self, valid: torch.Tensor) -> torch.Tensor:
        """[b, n] RoPE positions of new tokens (valid [b, n]): the real tokens before each one."""
        before = 0 if self.tokens_seen is None else self.tokens_seen[:, None]
        counted = valid.long().sum(-1)
        self.tokens_seen = counted if self.tokens_seen is None else self.tokens_seen + counted
        return (before + valid.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class LatentPass:
    """The `attention_mask` of one pass: queries write `stream`, attend streams
    stream - streams_seen + 1 .. stream (model/attention.py's structured-mask protocol).

    Query i of sequence b is the entry at index `cached + token` of its stream; it sees the
    entries of every visible stream up to that index that are real (store.valid). A padded
    query that would see no key attends its own entry only (finite, and never seen by real
    queries). With `live`, the queries are the packed live tokens (LivePacking).
    """

    store: LatentKVStore
    stream: int
    streams_seen: int
    live: LivePacking | None = None
    _allowed: torch.Tensor | None = field(default=None, repr=False)

    def expose(self, layer_number: int, key: torch.Tensor, value: torch.Tensor) -> tuple:
        """Write this pass's keys/values; return those of the visible streams [seen S, b, ng, hn]."""
        self.store.write(layer_number, self.stream, key, value, self.live)
        return self.store.read(layer_number, self.stream - self.streams_seen + 1, self.stream)

    def queries(self, query: torch.Tensor) -> torch.Tensor:
        return query if self.live is None else self.live.queries(query)

    def context(self, context: torch.Tensor) -> torch.Tensor:
        return context if self.live is None else self.live.context(context)

    def _plain(self) -> bool:
        """Every new token queries, nothing cached, nothing padded (a training pass over all tokens)."""
        return self.live is None and self.store.cached == 0 and self.store.valid is None

    def is_causal(self) -> bool:
        """A plain pass over one stream is ordinary causal attention (no mask materialised)."""
        return self._plain() and self.streams_seen == 1

    def attention_pass(self) -> AttentionPass:
        """What attention.py picks the kernel from: a plain pass over one stream is causal, over
        several streams it is that many causal blocks of the same tokens (stepwise pass k with
        every token live); packed live queries, cached or padded entries: an arbitrary mask."""
        if not self._plain():
            return AttentionPass("masked")
        if self.streams_seen == 1:
            return AttentionPass("causal")
        return AttentionPass("step_blocks", self.streams_seen)

    def _query_index(self, device) -> torch.Tensor:
        """[b or 1, nq] each query's index in its stream."""
        if self.live is not None:
            return self.store.cached + self.live.query_tokens.to(device)
        return self.store.cached + torch.arange(self.store.num_new, device=device)[None]

    def allowed_keys(self, device) -> torch.Tensor:
        """[nq, seen S] (a plain pass) or [b, 1, nq, seen S] bool, True = attend; built once
        per pass (every layer of the pass shares it)."""
        if self._allowed is None:
            if self._plain():
                self._allowed = stepwise_pass_mask(self.store.num_new, self.streams_seen - 1, device)
            else:
                query = self._query_index(device)[:, :, None]  # [b|1, nq, 1]
                key = torch.arange(self.store.length, device=device)
                allowed = key <= query
                if self.store.valid is not None:
                    allowed = allowed & self.store.valid.to(device)[:, None, :]
                    allowed = allowed | ((key == query) & ~allowed.any(-1, keepdim=True))
                self._allowed = allowed.repeat(1, 1, self.streams_seen).unsqueeze(1)
        return self._allowed

    def mask_mod(self):
        """FlexAttention mask_mod of `allowed_keys`: key slot j is entry j % S of its stream."""
        if self.store.valid is not None:
            allowed = self.allowed_keys(self.store.valid.device)
            return lambda b, h, q, kv: allowed[b, 0, q, kv]
        length = self.store.length
        if self.live is None:
            cached = self.store.cached
            return lambda b, h, q, kv: kv % length <= q + cached
        query = self._query_index(self.live.query_tokens.device)
        return lambda b, h, q, kv: kv % length <= query[b, q]


@dataclass
class LatentRun:
    """One forward's latent state (one micro-batch; one decoding call).

    token_states: [n, b, h] the new tokens' scaled embeddings (first stage).
    rotary: the model's RotaryEmbedding; positions: [n] (shared by the batch) or [n, b].
    store: the KV store (a persisting cache when decoding); halting: HaltingState (last stage
        decides, the others receive); valid: [b, n] real new tokens (None: all).
    step_states: the step outputs the halting state mixes (last stage).
    slots: a schedule's own carried state (the interleaved layout's slots, first stage).
    """

    token_states: torch.Tensor | None
    rotary: object
    positions: torch.Tensor
    store: LatentKVStore
    halting: HaltingState
    valid: torch.Tensor | None = None
    step_states: list = field(default_factory=list)
    slots: torch.Tensor | None = None
    jacobi_iters: int | None = None
    _table: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def start(cls, token_states, rotary, positions, batch: int, store=None, valid=None, threshold=None):
        """A run over the new tokens at positions [n] or [n, b]; valid [b, n] (decoding's padding);
        threshold: the halting tau of this forward (None: the configured one)."""
        store = LatentKVStore() if store is None else store
        valid_tokens = None if valid is None else valid.t()
        halting = HaltingState((positions.shape[0], batch), positions.device, valid_tokens, threshold)
        return cls(token_states, rotary, positions, store, halting, valid)

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    def rotary_table(self) -> torch.Tensor:
        """[n, 1 or b, 1, dim] RoPE of the new tokens at their positions (built once)."""
        if self._table is None:
            self._table = rotary_at(self.rotary, self.positions)
        return self._table


def rotary_at(rotary, positions: torch.Tensor) -> torch.Tensor:
    """megatron-core's RoPE table at explicit positions: [S] -> [S, 1, 1, dim], [S, b] -> [S, b, 1, dim].

    megatron-core's `RotaryEmbedding` returns the table of positions 0..L-1 and GPTModel ignores
    `position_ids` under RoPE; latent slots (every slot of token t at t) and decoding (positions
    after the cache) index the same table, so `apply_rotary_pos_emb` works unchanged. The table's
    length is bounded by the positions' count for 1-D positions (training: no host sync).
    """
    length = positions.shape[0] if positions.dim() == 1 else int(positions.max()) + 1
    table = rotary(length)  # [L, 1, 1, dim]
    if positions.dim() == 1:
        return table[positions.to(table.device)]
    return table[:, 0][positions.to(table.device)]


def run_block(block, hidden_states, attention_mask, rotary_pos_emb) -> torch.Tensor:
    """One pass of `block` (a TransformerBlock); under `latent_recompute == 'full'` with grad
    enabled, inside torch.utils.checkpoint (non-reentrant: tensors read from earlier passes' KV
    store keep their graph, and a recomputed pass rewrites its own store entries)."""

    def run():
        return block(
            hidden_states=hidden_states, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb
        )

    if getattr(block.config, "latent_recompute", None) == "full" and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(run, use_reentrant=False)
    return run()


def stream_pass(block, run: LatentRun, inputs: torch.Tensor, stream: int, streams_seen: int) -> torch.Tensor:
    """One pass of the new tokens through `block`, writing `stream` and attending
    `streams_seen` streams: inputs [n, b, h] -> outputs [n, b, h].

    Only the tokens of `run.halting.executing` are computed (packed, LivePacking); the others
    keep their input as their state and expose the previous stream's keys/values. A pass no
    token executes computes nothing and repeats the previous stream.
    """
    halting = run.halting
    if halting.none_executing():
        run.store.reuse(stream)
        return inputs
    if halting.all_executing():
        return run_block(block, inputs, LatentPass(run.store, stream, streams_seen), run.rotary_table())
    live = halting.packing()
    table = run.rotary_table()
    table = live.gather(table.expand(inputs.shape[0], inputs.shape[1], *table.shape[2:]))
    packed = run_block(block, live.gather(inputs), LatentPass(run.store, stream, streams_seen, live), table)
    return live.scatter(packed, inputs)
