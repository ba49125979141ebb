"""examples/compare_small.py's scheduler (`run_all`): which runs it starts, in what order, with how
many iterations, and what it skips on a rerun. Training itself is replaced by a recorder here:
`run_model` is pretrain_lcot.py + tools/evaluate.py, which their own tests cover; what is under
test is the orchestration of a 77-minute comparison (parallel runs, the equal-FLOPs dependency,
resuming from results.json)."""

from __future__ import annotations

import json
import os
import sys
import threading

from tests.conftest import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "examples"))

import compare_small  # noqa: E402

SCALE = {"iters": 100}
# training FLOPs per run: the equal-FLOPs vanilla must get 100 * 5 / 2 = 250 iterations on seed 1
TRAIN_FLOPS = {("vanilla", 1): 2.0, ("adaptive_k3", 1): 5.0, ("vanilla", 2): 2.0, ("adaptive_k3", 2): 3.0}


def _recorder(calls: list, lock: threading.Lock):
    def run_model(name, seed, scale, common, iters, out_dir, tasks, held_out, log_file):
        with lock:
            calls.append((name, seed, iters, log_file))
        return {
            "model": name,
            "seed": seed,
            "iters": iters,
            "train_flops": TRAIN_FLOPS.get((name, seed), iters),
        }

    return run_model


def test_equal_flops_vanilla_gets_the_adaptive_runs_flops_and_reruns_skip_recorded_runs(
    tmp_path, monkeypatch
):
    calls, lock = [], threading.Lock()
    monkeypatch.setattr(compare_small, "run_model", _recorder(calls, lock))
    models = ["vanilla", "adaptive_k3", "vanilla_eq_flops"]

    runs = compare_small.run_all(models, 2, SCALE, [], str(tmp_path), [], "", jobs=2)

    assert sorted(calls) == sorted(
        [
            ("vanilla", 1, 100, True),
            ("adaptive_k3", 1, 100, True),
            ("vanilla", 2, 100, True),
            ("adaptive_k3", 2, 100, True),
            ("vanilla_eq_flops", 1, 250, True),
            ("vanilla_eq_flops", 2, 150, True),
        ]
    )
    assert [(r["model"], r["seed"]) for r in runs] == [(m, s) for s in (1, 2) for m in models]
    with open(tmp_path / "results.json") as f:
        assert json.load(f) == runs

    calls.clear()  # a rerun (e.g. after an interruption) starts nothing that is recorded
    assert compare_small.run_all(models, 2, SCALE, [], str(tmp_path), [], "", jobs=1) == runs
    assert calls == []

    calls.clear()  # a longer schedule is a new run, a third seed too
    compare_small.run_all(["vanilla"], 3, {"iters": 120}, [], str(tmp_path), [], "", jobs=1)
    assert calls == [("vanilla", 1, 120, False), ("vanilla", 2, 120, False), ("vanilla", 3, 120, False)]


def test_equal_flops_without_its_references_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare_small, "run_model", _recorder([], threading.Lock()))
    try:
        compare_small.run_all(["vanilla", "vanilla_eq_flops"], 1, SCALE, [], str(tmp_path), [], "", jobs=1)
    except SystemExit as exit_:
        assert "vanilla_eq_flops needs adaptive_k3 and vanilla in --models" in str(exit_)
    else:
        raise AssertionError("run_all accepted vanilla_eq_flops without adaptive_k3")


def test_iso_flops_budgets_follow_each_models_pilot_and_reuse_it_within_five_percent(tmp_path, monkeypatch):
    """--iso-flops: budget B gives a model B x 100 x (vanilla FLOPs / its FLOPs) iterations, both
    from the pilot runs at 100 iterations: ponderlm2_k1 at 4.1x vanilla's cost gets 24 and 49
    iterations for 1x and 2x, and at 4x it is its own pilot (98 is within 5% of 100); vanilla's
    1x is its pilot; adaptive at 1.5x gets 67, 133 and 267."""
    flops = {("vanilla", 1): 2.0, ("ponderlm2_k1", 1): 8.2, ("adaptive_k3", 1): 3.0}
    calls, lock = [], threading.Lock()

    def run_model(name, seed, scale, common, iters, out_dir, tasks, held_out, log_file):
        with lock:
            calls.append((name, iters))
        record = {"model": name, "seed": seed, "iters": iters, "train_flops": flops.get((name, seed), iters)}
        return {**record, "ppl": 500.0, "inference_flops_per_token": 1.0, "mean_latent_steps": 0.0}

    monkeypatch.setattr(compare_small, "run_model", run_model)
    models = ["vanilla", "ponderlm2_k1", "adaptive_k3"]
    runs = compare_small.run_all(models, 1, SCALE, [], str(tmp_path), [], "", jobs=2, budgets=[1, 2, 4])

    assert sorted(calls) == sorted(
        [
            ("vanilla", 100),
            ("vanilla", 200),
            ("vanilla", 400),
            ("ponderlm2_k1", 100),
            ("ponderlm2_k1", 24),
            ("ponderlm2_k1", 49),
            ("adaptive_k3", 100),
            ("adaptive_k3", 67),
            ("adaptive_k3", 133),
            ("adaptive_k3", 267),
        ]
    )
    points = {(m, b): r["iters"] for m, _, b, r in compare_small.iso_flops_points(runs, [1, 2, 4], 100)}
    assert points == {
        ("vanilla", 1): 100,
        ("vanilla", 2): 200,
        ("vanilla", 4): 400,
        ("ponderlm2_k1", 1): 24,
        ("ponderlm2_k1", 2): 49,
        ("ponderlm2_k1", 4): 100,
        ("adaptive_k3", 1): 67,
        ("adaptive_k3", 2): 133,
        ("adaptive_k3", 4): 267,
    }
    table = compare_small.iso_flops_table(compare_small.iso_flops_points(runs, [1, 2, 4], 100), [1, 2, 4])
    assert "| ponderlm2_k1 | 4x | 1 | 100 |" in table


def test_iso_flops_without_vanilla_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(compare_small, "run_model", _recorder([], threading.Lock()))
    try:
        compare_small.run_all(["adaptive_k3"], 1, SCALE, [], str(tmp_path), [], "", jobs=1, budgets=[1])
    except SystemExit as exit_:
        assert "--iso-flops needs vanilla in --models" in str(exit_)
    else:
        raise AssertionError("run_all accepted --iso-flops without vanilla")
