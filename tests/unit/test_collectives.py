"""The one door for collectives (all_reduce, all_gather) refuses tensors off `parallel.device()`,
so CPU tests catch what NCCL would reject on GPUs; the statistics vector is built where the loss
lives."""

from __future__ import annotations

import pytest
import torch

from megatron_lcot import parallel
from megatron_lcot.model import LcotOutput
from megatron_lcot.training.metrics import reduce_statistics, token_statistics


@pytest.fixture(scope="module")
def world_of_one():
    parallel.initialize(1, 1, seed=3)


@pytest.mark.parametrize("collective", ["all_reduce", "all_gather"])
def test_collectives_refuse_a_cpu_tensor_when_the_device_is_a_gpu(world_of_one, monkeypatch, collective):
    monkeypatch.setattr(parallel, "device", lambda: torch.device("cuda", 0))
    message = f"{collective} got a tensor on cpu, but collectives run on cuda:0"
    with pytest.raises(parallel.WrongDeviceError, match=message):
        getattr(parallel, collective)(torch.zeros(3))


def test_all_reduce_accepts_a_tensor_on_the_device(world_of_one):
    total = parallel.all_reduce(torch.ones(3, device=parallel.device()))
    assert torch.equal(total, torch.ones(3))


def test_statistics_live_on_the_loss_device_and_reach_the_collective_there(world_of_one, monkeypatch):
    """Losses on the 'meta' device stand in for GPU tensors: the statistics vector must follow
    them (a CPU-built vector is what broke NCCL runs), and the reduction accepts it."""
    loss = torch.ones(2, 3, device="meta")
    output = LcotOutput(
        loss=loss, lm_loss=loss, latent_steps=torch.zeros(2, 3, device="meta"), expected_latent_steps=loss
    )
    stats = token_statistics(output, torch.ones(2, 3, device="meta"), max_latent_steps=2)
    assert stats.device.type == "meta"
    monkeypatch.setattr(parallel, "device", lambda: torch.device("meta"))
    assert reduce_statistics([{"stats": stats}], group=None).device.type == "meta"


def test_all_gather_in_a_world_of_one_stacks_the_one_tensor(world_of_one):
    gathered = parallel.all_gather(torch.arange(3.0, device=parallel.device()))
    assert gathered.shape == (1, 3) and torch.equal(gathered[0], torch.arange(3.0))
