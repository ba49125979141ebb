"""What an entry point hands the training loop.

As Megatron-LM's `pretrain_gpt.py` supplies `model_provider`, `forward_step` and the datasets
provider, `pretrain_lcot.py` hands these to the loop (the model itself is built by
`model/building.py`, which tools use directly):

    model_provider(config, pre_process, post_process) -> LcotGPTModel   (one pipeline stage)
    forward_step(config, data_iterator, model, halting) -> (output, loss_func)
    train_valid_test_datasets_provider(tokenizer, config, num_samples) -> (train, valid, test)
"""

from __future__ import annotations

from functools import partial

import torch

from megatron_lcot import parallel
from megatron_lcot.data.datasets import build_gpt_datasets
from megatron_lcot.model.building import build_model
from megatron_lcot.run_config import RunConfig
from megatron_lcot.training.metrics import token_statistics


def model_provider(config: RunConfig, pre_process: bool = True, post_process: bool = True):
    """One pipeline stage of the model that `config` describes, at its TP/PP layout."""
    return build_model(
        config.model,
        config.parallel.tensor_model_parallel_size,
        config.parallel.pipeline_model_parallel_size,
        pre_process,
        post_process,
    )


def train_valid_test_datasets_provider(tokenizer, config: RunConfig, num_samples: list):
    """GPTDataset splits of --data-path (or mock data) with at least `num_samples` samples each
    (`tokenizer` bound by the entry point)."""
    return build_gpt_datasets(config.data, config.model.seq_length, config.model.seed, tokenizer, num_samples)


def loss_func(max_latent_steps: int, loss_mask: torch.Tensor, output):
    """Sum of the per-token training loss over the loss tokens, their count, and statistics.

    output: LcotOutput ([batch, seq] fields). The schedule divides the sum by the count and
    the number of micro-batches before backward.
    """
    mask = loss_mask.to(output.loss.dtype)
    loss_sum = (output.loss.float() * mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"stats": token_statistics(output, loss_mask, max_latent_steps)}


def forward_step(config: RunConfig, data_iterator, model, halting=None):
    """Run one micro-batch: (LcotOutput or stage output, loss_func). halting: the training
    iteration's HaltingSettings (the loop's HaltingSchedule; None in evaluation)."""
    batch = {
        key: value.to(parallel.device(), non_blocking=True) for key, value in next(data_iterator).items()
    }
    output = model(
        batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"], halting=halting
    )
    return output, partial(loss_func, config.model.latent_steps, batch["loss_mask"])
