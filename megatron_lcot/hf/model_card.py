"""The README.md of an export: what the model is, how it was trained, how well it does, how to load it.

Every number comes from the checkpoint, never from the user's memory:

* mode, K, layout and the halting recipe (threshold, loss weight, warm-up, correctness exponent,
  router learning-rate multiplier): the flags stored in the checkpoint (`run.pt`);
* training tokens and FLOPs: the checkpoint's `TrainState` (`consumed_train_samples` x
  `--seq-length`; `train_flops`, counted on the last pipeline stage, so the largest value over
  the model-parallel rank files). A weights-only checkpoint (an import, a reshard) has none:
  the card says "not recorded";
* held-out perplexity: the output of `tools/evaluate.py --input` (its last JSON line) passed as
  `--eval-result`, else the last validation of the run's `--metrics-file` at or before the
  exported iteration, else "not measured".
"""

from __future__ import annotations

import glob
import json
import math
import os

import torch

from megatron_lcot.checkpoint.checkpointing import CHECKPOINT_FILENAME, iteration_dir
from megatron_lcot.hf.errors import ConversionError
from megatron_lcot.run_config import ModelSection, RunConfig


def training_record(root: str, iteration: int) -> dict | None:
    """{"tokens", "flops", "samples"} of the run up to `iteration`, or None (weights only)."""
    states = []
    for path in glob.glob(os.path.join(iteration_dir(root, iteration), "mp_rank_*", CHECKPOINT_FILENAME)):
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if isinstance(saved.get("train_state"), dict):
            states.append(saved["train_state"])
    if not states:
        return None
    flops = max(state.get("train_flops", 0.0) for state in states)
    return {"samples": states[0]["consumed_train_samples"], "flops": flops}


def last_validation(metrics_file: str | None, iteration: int) -> dict | None:
    """The last `split: valid` record of a --metrics-file at or before `iteration` (None if none)."""
    if not metrics_file or not os.path.isfile(metrics_file):
        return None
    found = None
    with open(metrics_file, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line) if line.strip() else {}
            if record.get("split") == "valid" and record.get("iteration", math.inf) <= iteration:
                found = record
    return found


def read_eval_result(path: str) -> dict:
    """The last JSON line of `tools/evaluate.py --input` output (ConversionError naming --eval-result)."""
    if not os.path.isfile(path):
        raise ConversionError(
            f"--eval-result {path!r}: no such file; pass the saved stdout of tools/evaluate.py."
        )
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    try:
        result = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        result = {}
    if "perplexity" not in result:
        raise ConversionError(
            f"--eval-result {path!r}: its last line is not tools/evaluate.py --input output "
            '(a JSON object with "perplexity").'
        )
    return result


def _mode(model: ModelSection) -> str:
    if model.latent_steps == 0:
        return "vanilla (no latent thoughts): a plain Llama"
    halting = "adaptive halting" if model.halting == "adaptive" else "every token runs all K steps"
    return f"{model.latent_steps} latent thoughts per token, {model.latent_layout} layout, {halting}"


def _halting_recipe(config: RunConfig) -> str:
    model = config.model
    if model.latent_steps == 0 or model.halting != "adaptive":
        return "none"
    warmup = model.halting_warmup_iters
    return (
        f"threshold tau {model.halting_threshold:g}, loss weight {model.halting_loss_weight:g}, warm-up "
        f"{warmup} iterations{' (no pruning while the loss weight ramps from 0)' if warmup else ''}, "
        f"correctness exponent {model.halting_correctness_exponent:g}, penalty on "
        f"{model.halting_penalty_fraction:g} of the executed tokens, router learning rate x "
        f"{config.optimizer.halting_router_lr_mult:g}"
    )


def _perplexity(eval_result: dict | None, validation: dict | None) -> str:
    if eval_result is not None:
        tokens, window, stride = (eval_result.get(key, "?") for key in ("tokens", "seq_length", "stride"))
        return (
            f"{eval_result['perplexity']:.4g} (tools/evaluate.py: {tokens} held-out tokens, windows of {window}, "
            f"stride {stride})"
        )
    if validation is not None:
        return (
            f"{validation['ppl']:.4g} (validation split at iteration {validation['iteration']}, "
            f"lm loss {validation['lm_loss']:.4f})"
        )
    return "not measured (pass --eval-result with tools/evaluate.py output)"


def _load_snippet(directory_name: str, latent: bool) -> str:
    remote = ", trust_remote_code=True" if latent else ""
    return f"""```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

path = "{directory_name}"  # this directory, or its Hub id
tokenizer = AutoTokenizer.from_pretrained(path{remote})
model = AutoModelForCausalLM.from_pretrained(path{remote}, dtype=torch.bfloat16)  # or float32
generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
print(generator("The Congress", max_new_tokens=32, do_sample=False)[0]["generated_text"])
```"""


def model_card(
    trained,
    directory_name: str,
    parameters: int,
    record: dict | None,
    validation: dict | None,
    eval_result: dict | None,
) -> str:
    """README.md text for an export of `trained` (inference.loading.TrainedModel)."""
    config = trained.config
    model = config.model
    latent = model.latent_steps > 0
    seq_length = model.seq_length
    if record is None:
        tokens = flops = "not recorded (a weights-only checkpoint)"
    else:
        tokens = f"{record['samples'] * seq_length:,} ({record['samples']:,} sequences of {seq_length})"
        flops = f"{record['flops']:.4g}" if record["flops"] else "not recorded"
    rows = [
        ("mode", _mode(model)),
        ("latent steps K", str(model.latent_steps)),
        ("halting recipe", _halting_recipe(config)),
        ("parameters", f"{parameters:,}"),
        (
            "shape",
            f"{model.num_layers} layers, hidden {model.hidden_size}, {model.num_attention_heads} heads, "
            f"{trained.model.config.num_query_groups} KV heads, FFN {trained.model.config.ffn_hidden_size}",
        ),
        ("vocabulary", f"{trained.vocab_size} ({config.data.tokenizer_type})"),
        (
            "training",
            f"iteration {trained.iteration}, sequence length {seq_length}, global batch "
            f"{config.training.global_batch_size}, lr {config.optimizer.lr:g}",
        ),
        ("training tokens", tokens),
        ("training FLOPs", flops),
        ("held-out perplexity", _perplexity(eval_result, validation)),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    tags = ["megatron-lcot", "llama"] + (["latent-reasoning"] if latent else [])
    remote_note = (
        "The modeling code ships in this directory (`configuration_lcot.py`, `modeling_lcot.py`; torch "
        "and transformers only): pass `trust_remote_code=True`."
        if latent
        else "A plain `LlamaForCausalLM`: no remote code."
    )
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [{", ".join(tags)}]
---

# {directory_name}

A causal language model trained with megatron-lcot and exported by
`tools/convert_checkpoint.py to-hf`. {remote_note}

| | |
|---|---|
{table}

## How to load

{_load_snippet(directory_name, latent)}

The tokenizer adds no BOS token (training separated documents by the end-of-document token,
which is `eos_token`). Logits over the whole sequence equal those of the training code in fp32.
"""
