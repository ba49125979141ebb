"""compat.check_versions: another megatron-core minor is refused with the fix named; other
differences only warn; the versions installed by the set-up pass silently. The CPU shim is
installed by parallel.initialize() and removed by parallel.destroy()."""

from __future__ import annotations

import importlib.metadata
import logging
import warnings

import pytest
import torch

from megatron_lcot import compat, parallel


def _installed(monkeypatch, **versions):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions.get(name) or real(name))


def test_the_pinned_versions_pass_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_versions(("megatron-core", "deepspeed", "torch", "lm_eval"))


def test_another_megatron_core_minor_is_refused(monkeypatch):
    _installed(monkeypatch, **{"megatron-core": "0.17.0"})
    with pytest.raises(
        compat.IncompatibleVersionError,
        match=r"megatron-core 0.17.0 is installed; megatron_lcot was written for 0.16.1 .*"
        r"pip install 'megatron-core==0.16.1'",
    ):
        compat.check_versions()


def test_other_differences_warn(monkeypatch):
    _installed(monkeypatch, **{"megatron-core": "0.16.2", "deepspeed": "0.20.0", "torch": "2.14.0+cu128"})
    with pytest.warns(UserWarning) as record:
        compat.check_versions()
    assert [str(w.message).split(" is installed")[0] for w in record] == [
        "megatron-core 0.16.2",
        "deepspeed 0.20.0",
        "torch 2.14.0+cu128",
    ]
    _installed(monkeypatch, torch="2.13.1+cu128")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_versions(("torch",))  # another torch patch release of 2.13 is what it was written for


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shim is installed only without CUDA")
def test_the_cpu_shim_lives_from_initialize_to_destroy():
    from megatron.core.tensor_parallel import random as tp_random

    shimmed = [(owner, name) for owner, name, _ in compat._cpu_shim_replacements()]
    assert (torch.cuda, "get_rng_state") in shimmed and len(shimmed) == 8
    parallel.destroy()
    originals = [getattr(owner, name) for owner, name in shimmed]
    rng_logger = logging.getLogger(tp_random.__name__)
    filters = list(rng_logger.filters)

    parallel.initialize(1, 1, seed=3)
    parallel.initialize(1, 1, seed=3)  # idempotent: the originals are saved once
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.equal(torch.cuda.get_rng_state(), torch.get_rng_state())
    replaced = [getattr(owner, name) is not original for (owner, name), original in zip(shimmed, originals)]
    assert replaced == [True] * len(shimmed)
    assert len(rng_logger.filters) == len(filters) + 1

    parallel.destroy()
    restored = [getattr(owner, name) is original for (owner, name), original in zip(shimmed, originals)]
    assert restored == [True] * len(shimmed)
    assert rng_logger.filters == filters
