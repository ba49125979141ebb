"""Our checkpoints as the lm-eval (EleutherAI lm-evaluation-harness 0.4.13) model `lcot`.

    python tools/lm_eval_lcot.py --model lcot --model_args load=CKPT_DIR --tasks TASK [--include_path DIR] ...

    import lm_eval
    import megatron_lcot.inference.lm_eval_adapter  # registers "lcot"
    lm_eval.simple_evaluate(model="lcot", model_args="load=CKPT_DIR", tasks=[...])

lm-eval 0.4.13 finds models only in its own registry (no entry points or plugins), so its
`lm_eval` console script cannot see `lcot`; `tools/lm_eval_lcot.py` imports this module and runs
lm-eval's own CLI (every lm-eval option works there).

model_args: `load` (required: a directory written by pretrain_lcot.py --save), `iteration`,
`tokenizer_model` (as tools/evaluate.py), `seq_length` (window, default the checkpoint's),
`stride` (rolling windows, default seq_length - 1). lm-eval's `batch_size`/`device` are accepted
and not used: requests are scored one window at a time, on `parallel.device()`.

The three request types reuse tools/evaluate.py's arithmetic (`inference/scoring.py`), on the
checkpoint's training forward in eval mode (adaptive halting as trained):

* `loglikelihood(context, continuation)`: `continuation_ids` + `continuation_loglikelihood`,
  exactly `evaluate.py --task` (split as lm-eval splits; an empty context is the eod token; a
  long input is cut on the left). `is_greedy`: every continuation token is the argmax.
* `loglikelihood_rolling(text)`: the text's tokens after one eod (lm-eval's prefix token: a
  document start), through `sliding_window_perplexity` with windows of `seq_length` moved by
  `stride`; with stride < seq_length every token is scored exactly once (the default,
  seq_length - 1, is lm-eval's one-token overlap). Unlike lm-eval's Hugging Face model, the last
  window is not extended leftwards (docs/hf.md, "Evaluate").
* `generate_until(context, gen_kwargs)`: `generation.generate_ids` (latent KV cache, per-token
  halting), greedy unless `do_sample`; the prompt is cut on the left to seq_length -
  max_gen_toks tokens; the text stops at eod and is cut before the first `until` string.
"""

from __future__ import annotations

import os

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from megatron_lcot.inference.generation import generate_ids
from megatron_lcot.inference.loading import load_trained_model
from megatron_lcot.inference.sampling import SamplingParams
from megatron_lcot.inference.scoring import (
    CheckpointScorer,
    continuation_ids,
    continuation_loglikelihood,
    sliding_window_perplexity,
)

# gen_kwargs generate_until understands (lm-eval tasks' `generation_kwargs`).
GENERATION_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p", "seed")


class ModelArgsError(ValueError):
    """A bad `--model_args` for `lcot`; the message names the argument and the fix."""


def checkpoint_dir(model_args: dict | None) -> str:
    """The `load=` directory of `model_args`, or ModelArgsError (before anything is loaded)."""
    load = (model_args or {}).get("load")
    if not load:
        raise ModelArgsError(
            "--model_args needs load=CKPT_DIR (a directory written by pretrain_lcot.py --save), "
            "e.g. --model_args load=checkpoints/adaptive"
        )
    if not os.path.isdir(str(load)):
        raise ModelArgsError(
            f"--model_args load={load}: no such directory; pass load=CKPT_DIR, a directory "
            "written by pretrain_lcot.py --save"
        )
    return str(load)


@register_model("lcot")
class LcotLM(LM):
    """See the module docstring."""

    def __init__(
        self,
        load: str | None = None,
        iteration: int | None = None,
        tokenizer_model: str | None = None,
        seq_length: int | None = None,
        stride: int | None = None,
        batch_size=None,
        max_batch_size=None,
        device=None,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise ModelArgsError(
                f"--model_args {', '.join(sorted(unknown))}: not understood by lcot; it takes "
                "load, iteration, tokenizer_model, seq_length, stride"
            )
        root = checkpoint_dir({"load": load})
        self.trained = load_trained_model(
            root, None if iteration is None else int(iteration), tokenizer_model
        )
        self.scorer = CheckpointScorer(self.trained)
        self.tokenize, self.eod = self.trained.tokenizer.tokenize, self.trained.tokenizer.eod
        self.seq_length = int(seq_length or self.trained.config.model.seq_length)
        self.stride = int(stride or self.seq_length - 1)
        if not 0 < self.stride < self.seq_length:
            raise ModelArgsError(
                f"--model_args stride={self.stride}: must be in [1, seq_length - 1 = "
                f"{self.seq_length - 1}] so that every token of a rolling window is scored"
            )

    def _answer_each(self, requests: list, kind: str, answer, disable_tqdm: bool) -> list:
        """answer(*request.args) for each request, each result handed to lm-eval's cache hook."""
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc=f"lcot {kind}"):
            results.append(answer(*request.args))
            self.cache_hook.add_partial(kind, request.args, results[-1])
        return results

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
        """[(sum log p(continuation | context), every continuation token greedy)] per request."""
        return self._answer_each(requests, "loglikelihood", self._loglikelihood, disable_tqdm)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
        """[sum log p(token | eod, earlier tokens in its window)] over every token of each text."""
        return self._answer_each(requests, "loglikelihood_rolling", self._loglikelihood_rolling, disable_tqdm)

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list:
        """[generated text, cut before the first stop string] per request."""
        return self._answer_each(requests, "generate_until", self._generate, disable_tqdm)

    def _loglikelihood(self, context: str, continuation: str) -> tuple:
        head, tail = continuation_ids(self.tokenize, context, continuation)
        return continuation_loglikelihood(self.scorer, head, tail, self.seq_length, self.eod)

    def _loglikelihood_rolling(self, text: str) -> float:
        tokens = self.tokenize(text)
        if not tokens:
            return 0.0
        scored = sliding_window_perplexity([self.eod, *tokens], self.scorer, self.seq_length, self.stride)
        return -scored["nll"] * scored["tokens"]

    def _generate(self, context: str, gen_kwargs: dict) -> str:
        unknown = set(gen_kwargs) - set(GENERATION_KWARGS)
        if unknown:
            raise ValueError(
                f"lcot generate_until: gen_kwargs {', '.join(sorted(unknown))} not supported "
                f"(it takes {', '.join(GENERATION_KWARGS)})"
            )
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.get("max_gen_toks", 256))
        if not 0 < max_new < self.seq_length:
            raise ValueError(
                f"lcot generate_until: max_gen_toks {max_new} must be in [1, seq_length - 1 = "
                f"{self.seq_length - 1}]"
            )
        temperature = float(gen_kwargs.get("temperature", 1.0))  # Hugging Face's default, as lm-eval's HFLM
        sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0
        sampling = SamplingParams(
            greedy=not sample,
            temperature=temperature if sample else 1.0,
            top_k=int(gen_kwargs.get("top_k") or 0),
            top_p=float(gen_kwargs.get("top_p") or 1.0),
            seed=int(gen_kwargs.get("seed") or 0),
        )
        prompt = (self.tokenize(context) or [self.eod])[-(self.seq_length - max_new) :]
        text = generate_ids(self.trained, [prompt], max_new, sampling).texts[0]
        for stop in until:
            text = text.split(stop)[0]
        return text
