"""Batched generation with left padding, the latent KV cache and per-token halting.

    from megatron_lcot.inference.loading import load_trained_model
    from megatron_lcot.inference.generation import generate
    from megatron_lcot.inference.sampling import SamplingParams

    trained = load_trained_model("checkpoints/adaptive")
    result = generate(trained, ["The Congress"], max_new_tokens=32, sampling=SamplingParams(greedy=True))
    result.texts, result.mean_latent_steps, result.decode_tokens_per_s

Prompts are tokenized as training data was (no BOS), left-padded to one length and prefilled
in one call per latent step; then one token per sequence per call. A sequence stops at the
tokenizer's eod (kept in its tokens, not in its text) or after `max_new_tokens`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from megatron_lcot import parallel
from megatron_lcot.inference.decoding import LatentDecoder
from megatron_lcot.model.engine import LatentKVStore
from megatron_lcot.inference.loading import TrainedModel
from megatron_lcot.inference.sampling import SamplingParams, next_tokens


@dataclass
class GenerationResult:
    """tokens[i]: generated ids of prompt i (ending with eod if it stopped there); texts[i]
    their text without eod. step_logits[i]: [new, vocab] logits each token was chosen from
    (real vocabulary) when `keep_logits`. latent_steps[i]: executed latent steps per generated
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
            ids[row, length - len(prompt):] = torch.tensor(prompt)
            valid[row, length - len(prompt):] = True
    return ids, valid


def generate_ids(trained: TrainedModel, prompts: list, max_new_tokens: int, sampling: SamplingParams,
                 keep_logits: bool = False, stop_at_eod: bool = True) -> GenerationResult:
    """Generate from prompts given as token id lists (each non-empty)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (an empty line gives none).")
    device = parallel.device()
    vocab = trained.vocab_size
    eod = trained.tokenizer.eod if trained.tokenizer is not None and stop_at_eod else None
    decoder, cache = LatentDecoder(trained.model), LatentKVStore()
    generator = torch.Generator().manual_seed(sampling.seed)
    ids, valid = left_pad(prompts)
    batch = len(prompts)
    tokens = [[] for _ in prompts]
    steps = [[] for _ in prompts]
    kept = [[] for _ in prompts] if keep_logits else None
    finished = torch.zeros(batch, dtype=torch.bool)

    start = time.perf_counter()
    logits, latent = decoder(cache, ids.to(device), valid.to(device))
    logits, latent = logits[:, -1, :vocab], latent[:, -1]
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for index in range(max_new_tokens):
        chosen = next_tokens(logits, sampling, generator).cpu()
        for row in range(batch):
            if finished[row]:
                continue
            tokens[row].append(int(chosen[row]))
            steps[row].append(float(latent[row]))
            if keep_logits:
                kept[row].append(logits[row].float().cpu())
            finished[row] = eod is not None and int(chosen[row]) == eod
        if bool(finished.all()) or index == max_new_tokens - 1:
            break
        # finished rows keep decoding (their tokens are dropped): the batch stays rectangular
        logits, latent = decoder(cache, chosen[:, None].to(device))
        logits, latent = logits[:, -1, :vocab], latent[:, -1]
    decode_s = time.perf_counter() - start
    texts = [trained.tokenizer.detokenize([t for t in row if t != eod]) if trained.tokenizer else "" for row in tokens]
    return GenerationResult(tokens, texts, steps, [torch.stack(r) for r in kept] if keep_logits else None,
                            prefill_s, decode_s)


def generate(trained: TrainedModel, prompts: list, max_new_tokens: int, sampling: SamplingParams,
             keep_logits: bool = False) -> GenerationResult:
    """Generate from text prompts (tokenized as training data was)."""
    return generate_ids(trained, [trained.tokenizer.tokenize(p) for p in prompts], max_new_tokens, sampling,
                        keep_logits)
