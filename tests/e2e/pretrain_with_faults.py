"""pretrain_lcot.py with one fault injected at a chosen rank and moment (tests only).

    LCOT_TEST_FAULT=KIND:RANK:N python tests/e2e/pretrain_with_faults.py PRETRAIN_FLAGS...

KIND (what a real cluster delivers, injected at its source, never in the code under test):
    nan_grad     the N-th backward through the output layer on RANK yields a NaN gradient
                 (a finite loss with a non-finite gradient: a bad kernel or a flipped bit)
    raise        the N-th forward step on RANK raises ValueError("injected fault") (a bug or
                 a bad sample that only one rank meets)
    save_fails   the N-th durable file write on RANK fails with ENOSPC (a full disk)
"""

from __future__ import annotations

import errno
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import pretrain_lcot  # noqa: E402
from megatron_lcot.checkpoint import checkpointing  # noqa: E402


def _nth_call(function, n: int, fault):
    """`function`, except that its n-th call runs `fault(*args)` instead."""
    calls = 0

    def wrapped(*args, **kwargs):
        nonlocal calls
        calls += 1
        return fault(*args, **kwargs) if calls == n else function(*args, **kwargs)

    return wrapped


def _install(kind: str, n: int) -> None:
    if kind == "nan_grad":
        provider = pretrain_lcot.model_provider

        def model_provider(*args, **kwargs):
            model = provider(*args, **kwargs)
            if getattr(model, "output_layer", None) is not None:
                weight = model.output_layer.weight
                weight.register_hook(_nth_call(lambda grad: grad, n, lambda grad: grad * float("nan")))
            return model

        pretrain_lcot.model_provider = model_provider
    elif kind == "raise":

        def fail(*args, **kwargs):
            raise ValueError("injected fault")

        pretrain_lcot.forward_step = _nth_call(pretrain_lcot.forward_step, n, fail)
    elif kind == "save_fails":

        def full_disk(path, write):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

        checkpointing._write_durably = _nth_call(checkpointing._write_durably, n, full_disk)
    else:
        raise SystemExit(f"LCOT_TEST_FAULT: unknown kind {kind!r}")


if __name__ == "__main__":
    kind, rank, n = os.environ["LCOT_TEST_FAULT"].split(":")
    if int(os.environ.get("RANK", "0")) == int(rank):
        _install(kind, int(n))
    pretrain_lcot.main(sys.argv[1:])
