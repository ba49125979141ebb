"""scripts/gpu_check.sh --cpu-dry-run: the GPU check's steps at tiny size on the CPU, so the
script is known to run end to end (every mode trains under the attention-dispatch check with
CUDA's plan, the throughput benchmark, the memory estimate of the example's flags)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import REPO_ROOT, tool_env


@pytest.mark.slow
def test_gpu_check_cpu_dry_run():
    result = subprocess.run(
        [os.path.join(REPO_ROOT, "scripts", "gpu_check.sh"), "--cpu-dry-run"],
        cwd=REPO_ROOT,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0 and summary["ok"], result.stderr[-3000:]
    assert set(summary["train"]) == {"vanilla", "stepwise", "adaptive", "interleaved"}
    assert "step_blocks:causal_blocks:torch.bfloat16" in summary["train"]["stepwise"]["attention_calls"]
    assert summary["memory"]["estimate_gib"] < 80
