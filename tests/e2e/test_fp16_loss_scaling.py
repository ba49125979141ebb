"""`--fp16` through megatron-core's optimizer: dynamic loss scaling skips the updates whose
scaled gradients overflow and, once the scale fits, trains as fp32 does (fp32 main weights).

(DeepSpeed's fp16 is not exercised here: DeepSpeed's CPU accelerator refuses fp16.)"""

from __future__ import annotations

import pytest

from tests.conftest import TINY_MODEL_FLAGS, read_metrics, run_pretrain

pytestmark = pytest.mark.slow

FLAGS = [
    *TINY_MODEL_FLAGS,
    "--mock-data",
    "--vocab-size",
    "200",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "4",
    "--train-iters",
    "4",
    "--log-interval",
    "1",
    "--eval-interval",
    "100",
    "--eval-iters",
    "1",
    "--lr",
    "1e-2",
    "--latent-steps",
    "2",
    "--halting",
    "adaptive",
]


def _train(tmp_path, name: str, *extra) -> list:
    metrics = tmp_path / f"{name}.jsonl"
    result = run_pretrain([*FLAGS, *extra, "--metrics-file", metrics], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return [r for r in read_metrics(metrics) if r["split"] == "train"]


def test_fp16_dynamic_loss_scale_skips_overflows_then_tracks_fp32(tmp_path):
    fp32 = _train(tmp_path, "fp32")
    overflowing = _train(tmp_path, "fp16_2e32", "--fp16")  # 2^32: every step overflows, nothing moves
    assert all(r["grad_norm"] != r["grad_norm"] for r in overflowing)  # nan: update skipped
    scaled = _train(tmp_path, "fp16_128", "--fp16", "--initial-loss-scale", "128")
    for got, want in zip(scaled, fp32, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=2e-3)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=2e-2)
    assert scaled[-1]["loss"] < scaled[0]["loss"] - 1.0
