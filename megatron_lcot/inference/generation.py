"""Batched generation with left padding, the latent KV cache and per-token halting.

    from megatron_lcot.inference.loading import load_trained_model
    from megatron_lcot.inference.generation import generate
    from megatron_lcot.inference.sampling import SamplingParams

    trained = load_trained_model("checkpoints/adaptive")
    result = generate(trained, ["The Congress"], max_new_tokens=32, sampling=SamplingParams(greedy=True))
    result.texts, result.mean_latent_steps, result.decode_tokens_per_s

Prompts are tokenized as training data was (no BOS), left-padded to one length and prefilled
in one call per latent step; then one token per sequence per call. A sequence stops at the
tokenizer's eod (kept in its tokens, not in its text), at a stop string (its text ends before
it; `text_stream.py`) or after `max_new_tokens`. `on_text(row, piece)` receives each row's text
as it becomes final, in order: the pieces of a row concatenate to its entry of `texts`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_lcot import parallel
from megatron_lcot.inference.decoding import LatentDecoder
from megatron_lcot.inference.loading import TrainedModel
from megatron_lcot.inference.sampling import SamplingParams, next_tokens
from megatron_lcot.inference.text_stream import TextStream
from megatron_lcot.model.engine import LatentKVStore


@dataclass
class GenerationResult:
    """tokens[i]: generated ids of prompt i (ending with eod, or with the token that completed a
    stop string, if it stopped there); texts[i] their text without eod, cut before a stop string,
    with the space that separates it from the prompt (prompt + text reads as one text).
    step_logits[i]: [new, vocab] logits each token was chosen from (real vocabulary, before the
    repetition penalty) when `keep_logits`. latent_steps[i]: executed latent steps per generated
    token (the step computing that token's successor)."""

    tokens: list
    texts: list
    latent_steps: list
    step_logits: list | None
    prefill_s: float
    decode_s: float

    @property
    def generated_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def mean_latent_steps(self) -> float:
        steps = [s for row in self.latent_steps for s in row]
        return sum(steps) / max(1, len(steps))

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def left_pad(prompts: list, pad_id: int = 0) -> tuple:
    """Token id lists -> (ids [b, L], valid [b, L]) with padding on the left."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), length), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, length - len(prompt) :] = torch.tensor(prompt)
            valid[row, length - len(prompt) :] = True
    return ids, valid


def generate_ids(
    trained: TrainedModel,
    prompts: list,
    max_new_tokens: int,
    sampling: SamplingParams,
    keep_logits: bool = False,
    stop_at_eod: bool = True,
    stop: tuple = (),
    on_text: Callable[[int, str], None] | None = None,
) -> GenerationResult:
    """Generate from prompts given as token id lists (each non-empty); `stop`: stop strings."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (an empty line gives none).")
    if stop and trained.tokenizer is None:
        raise ValueError("stop strings need the checkpoint's tokenizer; pass --tokenizer-model.")
    device = parallel.device()
    vocab = trained.vocab_size
    eod = trained.tokenizer.eod if trained.tokenizer is not None and stop_at_eod else None
    detokenize = trained.tokenizer.detokenize if trained.tokenizer is not None else lambda ids: ""
    streams = [TextStream(detokenize, stop, eod, context=prompt[-1:]) for prompt in prompts]
    decoder, cache = LatentDecoder(trained.model), LatentKVStore()
    generator = torch.Generator().manual_seed(sampling.seed)
    ids, valid = left_pad(prompts)
    batch = len(prompts)
    # ids in each sequence, for the repetition penalty (padding marks a spare last column)
    seen = torch.zeros((batch, vocab + 1), dtype=torch.bool).scatter_(1, torch.where(valid, ids, vocab), True)
    seen = seen[:, :vocab].to(device)
    steps = [[] for _ in prompts]
    kept = [[] for _ in prompts] if keep_logits else None

    def emit(row: int, piece: str) -> None:
        if piece and on_text is not None:
            on_text(row, piece)

    start = time.perf_counter()
    logits, latent = decoder(cache, ids.to(device), valid.to(device))
    logits, latent = logits[:, -1, :vocab], latent[:, -1]
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for index in range(max_new_tokens):
        chosen = next_tokens(logits, sampling, generator, seen)
        seen[torch.arange(batch, device=seen.device), chosen] = True
        chosen = chosen.cpu()
        for row, stream in enumerate(streams):
            if stream.finished:
                continue
            steps[row].append(float(latent[row]))
            if keep_logits:
                kept[row].append(logits[row].float().cpu())
            emit(row, stream.push(int(chosen[row])))
        if all(stream.finished for stream in streams) or index == max_new_tokens - 1:
            break
        # finished rows keep decoding (their tokens are dropped): the batch stays rectangular
        logits, latent = decoder(cache, chosen[:, None].to(device))
        logits, latent = logits[:, -1, :vocab], latent[:, -1]
    decode_s = time.perf_counter() - start
    for row, stream in enumerate(streams):
        emit(row, stream.close())
    return GenerationResult(
        [s.tokens for s in streams],
        [s.text for s in streams],
        steps,
        [torch.stack(r) for r in kept] if keep_logits else None,
        prefill_s,
        decode_s,
    )


def generate(
    trained: TrainedModel,
    prompts: list,
    max_new_tokens: int,
    sampling: SamplingParams,
    keep_logits: bool = False,
    stop: tuple = (),
    on_text: Callable[[int, str], None] | None = None,
) -> GenerationResult:
    """Generate from text prompts (tokenized as training data was)."""
    return generate_ids(
        trained,
        [trained.tokenizer.tokenize(p) for p in prompts],
        max_new_tokens,
        sampling,
        keep_logits,
        stop=stop,
        on_text=on_text,
    )
