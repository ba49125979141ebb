"""What an entry point hands the training loop, shared by every tool that builds the model.

As Megatron-LM's `pretrain_gpt.py` supplies `model_provider`, `forward_step` and the datasets
provider, these live here so that `pretrain_lcot.py`, checkpoint conversion, generation and
evaluation build the same model from the same flags:

    lcot_config_from_args(args) -> LcotConfig             (every config field named by a flag)
    model_provider(args, pre_process, post_process) -> LcotGPTModel   (one pipeline stage)
    forward_step(args, data_iterator, model) -> (output, loss_func)
    train_valid_test_datasets_provider(args, tokenizer, num_samples) -> (train, valid, test)
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch

from megatron_lcot import parallel
from megatron_lcot.data.datasets import build_gpt_datasets
from megatron_lcot.model import build_lcot_model, llama_config
from megatron_lcot.model.config import LcotConfig
from megatron_lcot.training.metrics import token_statistics

# Flags that name a config field but whose value the Llama recipe derives (llama_config's
# positional arguments and defaults), so they are passed explicitly instead of by name.
_LLAMA_ARGUMENTS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "num_query_groups",
                    "init_method_std")


def lcot_config_from_args(args) -> LcotConfig:
    """The LcotConfig the flags describe, as Megatron-LM's `core_transformer_config_from_args`:
    every flag whose name is a config field (`--latent-steps` -> `latent_steps`,
    `--tensor-model-parallel-size`, `--bf16`, ...) is copied by name, so a new latent field
    needs a flag and nothing else. Flags left at None keep the config's default."""
    names = {f.name for f in dataclasses.fields(LcotConfig)} - set(_LLAMA_ARGUMENTS)
    by_name = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if getattr(args, "fp16", False) else torch.float32
    return llama_config(
        *(getattr(args, name) for name in _LLAMA_ARGUMENTS),
        **by_name,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        batch_p2p_comm=parallel.backend() != "gloo",  # batched p2p is wrong on gloo (PLATFORM.md)
    )


def model_provider(args, pre_process: bool = True, post_process: bool = True):
    """One pipeline stage of the model that the flags describe (bf16 weights with --bf16; the
    optimizer keeps fp32 main copies)."""
    return build_lcot_model(lcot_config_from_args(args), vocab_size=args.padded_vocab_size,
                            max_sequence_length=args.max_position_embeddings,
                            pre_process=pre_process, post_process=post_process,
                            use_te=args.transformer_impl == "transformer_engine")


def train_valid_test_datasets_provider(args, tokenizer, num_samples: list):
    """GPTDataset splits of --data-path (or mock data) with at least `num_samples` samples each."""
    return build_gpt_datasets(args, tokenizer, num_samples)


def loss_func(max_latent_steps: int, loss_mask: torch.Tensor, output):
    """Sum of the per-token training loss over the loss tokens, their count, and statistics.

    output: LcotOutput ([batch, seq] fields). The schedule divides the sum by the count and
    the number of micro-batches before backward.
    """
    mask = loss_mask.to(output.loss.dtype)
    loss_sum = (output.loss.float() * mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"stats": token_statistics(output, loss_mask, max_latent_steps)}


def forward_step(args, data_iterator, model):
    """Run one micro-batch: (LcotOutput or stage output, loss_func)."""
    batch = {key: value.to(parallel.device(), non_blocking=True) for key, value in next(data_iterator).items()}
    output = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
    return output, partial(loss_func, args.latent_steps, batch["loss_mask"])
