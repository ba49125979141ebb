"""Log-likelihood scoring shared by `tools/evaluate.py`: perplexity over sliding windows and
zero-shot multiple-choice / cloze tasks, for our checkpoints and for Hugging Face exports.

A *scorer* maps one window of token ids [1, s] to (log-probabilities [s, vocab] over the real
vocabulary, executed latent steps [s]); position i predicts token i+1.

* `CheckpointScorer`: the training model's own forward in eval mode (interleaved: Jacobi with
  the checkpoint's `--jacobi-eval-iters`), latent steps read from its output.
* `HFScorer`: `AutoModelForCausalLM` on an exported directory (latent steps from its output).

Perplexity windows (`sliding_window_perplexity`): the file's documents are tokenized as training
data (no BOS, each document followed by eod) into one stream of N tokens. Window w covers tokens
[w*stride, min(w*stride + seq_length, N)); it scores the targets that no earlier window scored,
each predicted from all the window's tokens before it. So the first window scores its tokens
1..end-1, every later window only its last `stride` targets (after seq_length - stride tokens of
context), the last window may be shorter, and the stream's first token is never scored. With
stride = seq_length (the default: no overlap) the first token of every window is not scored
either (nothing in its window precedes it): `tokens` in the result says how many were.
"""

from __future__ import annotations

import math
import time

import torch

from megatron_lcot import parallel


class CheckpointScorer:
    """Our model (TrainedModel from inference.loading)."""

    def __init__(self, trained) -> None:
        self.trained = trained
        self.max_latent_steps = trained.config.model.latent_steps

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> tuple:
        """(log-probabilities [s, vocab], latent steps [s]) of one window `ids` [1, s], both
        read from the model's output (the model runs exactly as at inference)."""
        ids = ids.to(parallel.device())
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        output = self.trained.model(ids, positions)
        logits = output.logits[0, :, : self.trained.vocab_size]
        steps = output.latent_steps[0] if output.latent_steps is not None else torch.zeros(ids.shape[1])
        return torch.log_softmax(logits.float(), -1).cpu(), steps.float().cpu()


class HFScorer:
    """An exported Hugging Face directory, through transformers alone."""

    def __init__(self, hf_dir: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(
            hf_dir, trust_remote_code=True, dtype=torch.float32
        ).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
        self.max_latent_steps = getattr(self.model.config, "latent_steps", 0)

    def tokenize(self, text: str) -> list:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def eod(self) -> int:
        return self.tokenizer.eos_token_id

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> tuple:
        output = self.model(input_ids=ids)
        steps = getattr(output, "latent_steps", None)
        steps = steps[0] if steps is not None else torch.zeros(ids.shape[1])
        return torch.log_softmax(output.logits[0].float(), -1), steps.float()


class LatentStepTally:
    """Executed latent steps of scored tokens: mean and share per count 0..K."""

    def __init__(self, max_latent_steps: int) -> None:
        self.counts = torch.zeros(max_latent_steps + 1, dtype=torch.float64)

    def add(self, steps: torch.Tensor) -> None:
        self.counts += torch.bincount(steps.round().long(), minlength=len(self.counts))[
            : len(self.counts)
        ].double()

    def summary(self) -> dict:
        total = float(self.counts.sum())
        shares = (self.counts / max(total, 1.0)).tolist()
        return {"mean_latent_steps": sum(k * s for k, s in enumerate(shares)), "halted_share": shares}


def sliding_window_perplexity(stream: list, scorer, seq_length: int, stride: int, progress=None) -> dict:
    """Perplexity of `stream` (token ids) with the windows of the module docstring."""
    if len(stream) < 2:
        raise ValueError("the input has fewer than 2 tokens: nothing to score.")
    tally = LatentStepTally(scorer.max_latent_steps)
    nll, scored, scored_until, begin = 0.0, 0, 1, 0
    start = time.perf_counter()
    while scored_until < len(stream):
        end = min(begin + seq_length, len(stream))
        window = torch.tensor(stream[begin:end])[None]
        logprobs, steps = scorer(window)
        first = max(1, scored_until - begin)  # first target (window index) not scored yet
        targets = window[0, first:]
        nll -= float(logprobs[first - 1 : end - begin - 1].gather(-1, targets[:, None]).sum())
        tally.add(steps[first - 1 : end - begin - 1])
        scored += len(targets)
        scored_until, begin = end, begin + stride
        if progress is not None:
            progress(scored, len(stream) - 1, time.perf_counter() - start)
    return {"perplexity": math.exp(nll / scored), "tokens": scored, "nll": nll / scored, **tally.summary()}


def continuation_ids(tokenize, context: str, continuation: str) -> tuple:
    """(context ids, continuation ids) split as lm-eval does: the whole text is tokenized and the
    continuation is what follows the context's own tokens (so a word keeps its leading space)."""
    whole, head = tokenize(context + continuation), tokenize(context)
    if whole[: len(head)] == head and len(whole) > len(head):
        return head, whole[len(head) :]
    return head, tokenize(continuation)


def continuation_loglikelihood(scorer, context: list, continuation: list, seq_length: int, eod: int) -> tuple:
    """(sum log p(continuation | context), whether every continuation token is the argmax).
    An empty context is the eod token (a document start); a long one is cut on the left."""
    ids = ((context or [eod]) + continuation)[-seq_length:]
    n = len(continuation)
    if not 0 < n < len(ids):
        raise ValueError(f"a continuation of {n} tokens does not fit a window of --seq-length {seq_length}.")
    logprobs, _ = scorer(torch.tensor(ids)[None])
    targets = torch.tensor(ids[-n:])
    predicted = logprobs[len(ids) - n - 1 : len(ids) - 1]
    return float(predicted.gather(-1, targets[:, None]).sum()), bool((predicted.argmax(-1) == targets).all())


def score_task(records: list, scorer, tokenize, seq_length: int, eod: int) -> dict:
    """Zero-shot scores of multiple-choice ({"context", "choices", "answer"}) and cloze
    ({"context", "target"}) records: accuracy, length-normalised accuracy (log-likelihood per
    character of the choice, lm-eval's acc_norm), cloze accuracy (every target token greedy) and
    the cloze targets' perplexity (per target token)."""
    mc_correct = mc_norm_correct = mc_items = 0
    cloze_correct = cloze_items = cloze_tokens = 0
    cloze_nll = 0.0
    for record in records:
        if "choices" in record:
            scores = []
            for choice in record["choices"]:
                context, continuation = continuation_ids(tokenize, record["context"], choice)
                loglik, _ = continuation_loglikelihood(scorer, context, continuation, seq_length, eod)
                scores.append((loglik, loglik / max(1, len(choice))))
            best = max(range(len(scores)), key=lambda i: scores[i][0])
            best_norm = max(range(len(scores)), key=lambda i: scores[i][1])
            mc_correct += best == record["answer"]
            mc_norm_correct += best_norm == record["answer"]
            mc_items += 1
        else:
            context, continuation = continuation_ids(tokenize, record["context"], record["target"])
            loglik, greedy = continuation_loglikelihood(scorer, context, continuation, seq_length, eod)
            cloze_correct += greedy
            cloze_nll -= loglik
            cloze_tokens += len(continuation)
            cloze_items += 1
    result = {"items": mc_items + cloze_items}
    if mc_items:
        result.update(
            multiple_choice_items=mc_items,
            accuracy=mc_correct / mc_items,
            accuracy_norm=mc_norm_correct / mc_items,
        )
    if cloze_items:
        result.update(
            cloze_items=cloze_items,
            cloze_accuracy=cloze_correct / cloze_items,
            cloze_target_perplexity=math.exp(cloze_nll / cloze_tokens),
        )
    return result
