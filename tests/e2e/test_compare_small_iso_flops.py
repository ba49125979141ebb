"""`examples/compare_small.py --iso-flops` end to end at a tiny schedule: real training runs of
vanilla and PonderLM-2 K=1 on the default corpus (the "cpu" scale's model, 8 iterations as the
1x budget, one seed, budgets 1x and 2x), held-out evaluation, the table and both plots. Each run's
logged training FLOPs must land on its budget (B x the vanilla pilot's FLOPs) within rounding:
5% (a budget within 5% of the pilot's iterations reuses the pilot) or half an iteration of the
model, whichever is larger."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, tool_env

SCRIPT = os.path.join(REPO_ROOT, "examples", "compare_small.py")
ITERS = 8


@pytest.mark.slow
@pytest.mark.timeout(3600)  # four training runs and evaluations; ~15 min on a loaded 2-core CPU
def test_iso_flops_runs_land_on_their_budgets_and_write_table_and_plots(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--iso-flops",
            "--models",
            "vanilla,ponderlm2_k1",
            "--budgets",
            "1,2",
            "--seeds",
            "1",
            "--train-iters",
            str(ITERS),
            "--out-dir",
            str(tmp_path),
        ],
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        runs = json.load(f)
    pilots = {r["model"]: r for r in runs if r["iters"] == ITERS}
    assert set(pilots) == {"vanilla", "ponderlm2_k1"}
    unit = pilots["vanilla"]["train_flops"]
    for name, pilot in pilots.items():
        per_iteration = pilot["train_flops"] / ITERS
        for budget in (1, 2):
            iters = round(budget * unit / per_iteration)
            iters = ITERS if abs(iters - ITERS) <= 0.05 * ITERS else iters
            run = next(r for r in runs if (r["model"], r["iters"]) == (name, iters))
            tolerance = max(0.05 * budget * unit, 0.5 * per_iteration)
            assert abs(run["train_flops"] - budget * unit) <= tolerance, (name, budget, run["train_flops"])
            assert run["ppl"] > 1 and run["inference_flops_per_token"] > 0
    table = (tmp_path / "iso_flops.md").read_text()
    for row in (
        "| vanilla | 1x | 1 |",
        "| vanilla | 2x | 1 |",
        "| ponderlm2_k1 | 1x | 1 |",
        "| ponderlm2_k1 | 2x | 1 |",
    ):
        assert row in table
    for axis in ("train", "inference"):
        assert (tmp_path / f"iso_flops_ppl_vs_{axis}_flops.png").stat().st_size > 1000
