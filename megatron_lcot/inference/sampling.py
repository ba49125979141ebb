"""Next-token choice from logits, with Hugging Face's meaning of each knob: repetition penalty,
then greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """greedy: argmax (ties to the lowest id, as torch.argmax); temperature 0 means greedy too
    (transformers' `do_sample=False`). Otherwise softmax(logits / temperature) restricted to the
    top_k most likely ids (0 = all) and to the smallest set whose probability reaches top_p
    (1.0 = all), sampled with a torch.Generator seeded by `seed`. repetition_penalty (1.0 = off)
    first divides the positive logits and multiplies the negative ones of every id already in
    the sequence, prompt included (CTRL, Keskar et al. 2019; transformers'
    RepetitionPenaltyLogitsProcessor)."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"--temperature {self.temperature} must be >= 0 (0 = greedy argmax).")
        if self.top_k < 0:
            raise ValueError(f"--top-k {self.top_k} must be >= 0 (0 keeps every token).")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p} must be in (0, 1].")
        if not self.repetition_penalty > 0:
            raise ValueError(
                f"--repetition-penalty {self.repetition_penalty} must be > 0 (1.0 = off; "
                "above 1 discourages repeats)."
            )
        if self.temperature == 0:
            object.__setattr__(self, "greedy", True)


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [b, vocab], seen [b, vocab] bool (ids already in each sequence) -> logits with
    the seen ids' positive values divided by `penalty` and negative ones multiplied by it."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def next_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits [b, vocab] (real vocabulary), seen [b, vocab] bool or None -> token ids [b]."""
    if seen is not None:
        logits = penalize_repetition(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(-1)
    logits = logits.float() / params.temperature
    if params.top_k > 0:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= params.top_p  # keep the first id past top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
