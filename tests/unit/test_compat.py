"""compat.check_versions: another megatron-core minor is refused with the fix named; other
differences only warn; the versions installed by the set-up pass silently."""

from __future__ import annotations

import importlib.metadata
import warnings

import pytest

from megatron_lcot import compat


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
