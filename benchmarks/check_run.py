"""Run a training script with the core attention's kernel choice checked, and report memory.

    python benchmarks/check_run.py --report OUT.json [--cuda-plan] SCRIPT [SCRIPT FLAGS...]
    torchrun --nproc-per-node 1 benchmarks/check_run.py --report OUT.json pretrain_lcot.py ...

SCRIPT runs in this process (runpy) under `torch.nn.attention.sdpa_kernel` without the math
backend, so on CUDA any SDPA call that only the math kernel takes (a boolean mask with grouped
query heads, fp32 with GQA) raises instead of silently keeping the score matrix. Every call
attention.py's `attention_call` picks is recorded, and one without a fused CUDA kernel
(`cuda_fused_kernels`) fails the run. `--cuda-plan` makes the core attention follow CUDA's plan
on any device (the CPU dry run of scripts/gpu_check.sh executes the CUDA calls on CPU tensors).
The report (rank 0): the calls made, the dtype, torch.cuda.max_memory_allocated on CUDA.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import runpy
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_lcot.model import attention

FUSED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def record_attention_calls(cuda_plan: bool) -> list:
    """Wrap attention.attention_call: every (call, dtype) it returns is appended to the list; a
    call CUDA would run on the math kernel raises."""
    calls, choose = [], attention.attention_call

    def checked(backend, device_type, described, dtype, dropout_p=0.0):
        device_type = "cuda" if cuda_plan else device_type
        call = choose(backend, device_type, described, dtype, dropout_p)
        if device_type == "cuda" and not attention.cuda_fused_kernels(call, dtype):
            raise RuntimeError(f"attention call {call!r} ({described}, {dtype}) has no fused CUDA kernel")
        calls.append((described.kind, call, str(dtype)))
        return call

    attention.attention_call = checked
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", required=True, help="JSON file written at exit (rank 0)")
    parser.add_argument("--cuda-plan", action="store_true", help="follow CUDA's attention plan on any device")
    parser.add_argument("script")
    ours, rest = parser.parse_known_args()
    calls = record_attention_calls(ours.cuda_plan)

    def report() -> None:
        if int(os.environ.get("RANK", "0")) != 0:
            return
        summary = sorted({f"{kind}:{call}:{dtype}" for kind, call, dtype in calls})
        out = {"attention_calls": summary, "num_calls": len(calls)}
        if torch.cuda.is_available():
            out["max_memory_allocated"] = torch.cuda.max_memory_allocated()
        with open(ours.report, "w") as handle:
            json.dump(out, handle)

    atexit.register(report)
    sys.argv = [ours.script, *rest]
    with sdpa_kernel(FUSED_BACKENDS):
        runpy.run_path(ours.script, run_name="__main__")


if __name__ == "__main__":
    main()
