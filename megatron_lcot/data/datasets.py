"""megatron.core.datasets glue: GPT datasets from flags, and a resumable data loader.

Datasets are megatron-core's `GPTDataset` (or `MockGPTDataset` for `--mock-data`) built by
`BlendedMegatronDatasetBuilder`, so `--data-path` blends and `--split` mean what they mean in
Megatron-LM. Each sample is a dict of `tokens`, `labels`, `loss_mask`, `position_ids`
(each `[seq]`).

The loader walks the dataset in order from a number of consumed samples (Megatron-LM's
`MegatronPretrainingSampler`; megatron-core does not ship one). Resuming with the
checkpoint's consumed-sample count therefore replays exactly the batches a straight run
would have seen next.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset


def gpt_dataset_config(data, seq_length: int, seed: int, tokenizer) -> GPTDatasetConfig:
    """The GPTDatasetConfig that `--data-path/--split/--seq-length/--seed` describe (data: the
    RunConfig's data section)."""
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=data.data_blend,
        split=data.split,
        path_to_cache=data.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )


def build_gpt_datasets(data, seq_length: int, seed: int, tokenizer, num_samples: list) -> tuple:
    """(train, valid, test) datasets of `data` (the RunConfig's data section) holding at least
    `num_samples[i]` samples of `seq_length` tokens each (None if the split is empty). Built on
    rank 0 first (it writes the index caches), then elsewhere."""
    dataset_class = MockGPTDataset if data.mock_data else GPTDataset
    builder = BlendedMegatronDatasetBuilder(
        dataset_class, num_samples, lambda: True, gpt_dataset_config(data, seq_length, seed, tokenizer)
    )
    return tuple(builder.build())


class PretrainingSampler:
    """Micro-batches of sample indices for one data-parallel rank, from `consumed_samples` on.

    Indices are taken in order in groups of `micro_batch_size * data_parallel_size`; rank r
    gets the r-th slice of each group. An incomplete last group is dropped.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ) -> None:
        if consumed_samples >= total_samples:
            raise ValueError(f"no samples left: consumed {consumed_samples} of {total_samples}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.rank_slice = slice(
            data_parallel_rank * micro_batch_size, (data_parallel_rank + 1) * micro_batch_size
        )
        self.group_size = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.group_size

    def __iter__(self) -> Iterator[list]:
        for start in range(self.consumed_samples, self.total_samples - self.group_size + 1, self.group_size):
            yield list(range(start, start + self.group_size))[self.rank_slice]


def build_data_iterator(
    dataset,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[dict] | None:
    """An iterator of micro-batches (dicts of `[micro_batch, seq]` tensors), or None without data."""
    if dataset is None:
        return None
    sampler = PretrainingSampler(
        len(dataset), consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size
    )
    # pinned batches make the host-to-GPU copy asynchronous; pinning needs CUDA
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )
    return iter(loader)
