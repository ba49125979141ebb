"""The fast paths against their references (fp32, CPU): packed passes of halted tokens, the
core-attention backends, activation recompute, and a smoke run of the throughput benchmark.

Every fast path is compared with something that does not share its code: the naive
token-by-token reference (tests/reference/naive_lm.py), the dense materialised-mask attention,
or the same model without recompute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.reference.helpers import max_abs, single_thread_fixture
from tests.unit.test_equivalence_model import (
    GRAD_PARAMS,
    _assert_grads_close,
    adaptive_model,
    batch,  # noqa: F401  (fixture)
    build,
    lcot_config,
    positions,
    ref_adaptive,
)

_single_thread = single_thread_fixture()

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# most tokens halt after step 0 (router bias -1.6 under tau 0.4), a few run 1..3 latent steps
MOSTLY_HALTED = dict(router_bias=-1.6)


# LcotConfig fields of the four modes these tests compare (adaptive halts with a decisive router).
MODE_FIELDS = {
    "vanilla": {},
    "stepwise": {"latent_steps": 2},
    "interleaved": {"latent_steps": 1, "latent_layout": "interleaved", "jacobi_iters": (1,)},
    "adaptive": {"latent_steps": 3, "halting": "adaptive", "halting_threshold": 0.4},
}


def decisive_router(model) -> None:
    """Router weights that make tokens halt at different steps (a fresh router halts none)."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(11)
        model.halting_router.weight.copy_(0.6 * torch.randn(model.halting_router.weight.shape, generator=gen))
        model.halting_router.bias.fill_(0.5)


def test_live_packing_gathers_and_scatters_live_tokens():
    """Proves LivePacking's bookkeeping: the packed rows are the live tokens of the whole
    micro-batch (no padding), sequence by sequence in token order; scatter puts packed rows back
    at their tokens and keeps the base elsewhere; attention's per-sequence layout flags its
    padding and maps back to the packed rows exactly."""
    from megatron_lcot.model.halting import LivePacking

    executing = torch.tensor([[1, 0], [0, 0], [1, 1], [1, 0], [0, 0]], dtype=torch.bool)  # [T=5, b=2]
    live = LivePacking(executing, live=4, widest=3)
    full = torch.arange(10.0).view(5, 2, 1)
    assert live.gather(full).shape == (4, 1, 1)
    assert torch.equal(live.gather(full)[:, 0, 0], torch.tensor([0.0, 4.0, 6.0, 5.0]))
    merged = live.scatter(-live.gather(full), full)
    want = torch.where(executing[..., None], -full, full)
    assert torch.equal(merged, want)
    assert live.query_tokens.tolist() == [[0, 2, 3], [2, 0, 0]]
    assert live.query_valid.tolist() == [[True, True, True], [True, False, False]]
    packed = torch.randn(4, 1, 3, 2)  # [N, 1, heads, hn]
    laid_out = live.queries(packed)  # [widest, b, heads, hn]
    assert laid_out.shape == (3, 2, 3, 2)
    torch.testing.assert_close(laid_out[0, 1], packed[3, 0])
    torch.testing.assert_close(live.context(laid_out.flatten(2)), packed.flatten(2))


def test_mostly_halted_adaptive_equals_naive_reference(batch):  # noqa: F811
    """Proves the packed passes (only live tokens computed, outputs and keys/values scattered
    back onto the previous step's, RoPE at the live tokens' positions, packed queries attending
    every exposed key) give the naive reference's logits, losses, executed steps and gradients
    when most tokens halt after step 0."""
    ids, labels = batch
    model = adaptive_model(**MOSTLY_HALTED)
    with torch.no_grad():
        want = ref_adaptive(model, ids, labels)
        out = model(ids, positions(), labels=labels)
    halted_after_0 = (want.latent_steps == 0).float().mean().item()
    assert 0.6 <= halted_after_0 < 1.0, f"fixture should halt most but not all tokens: {halted_after_0:.2f}"
    assert (want.latent_steps >= 2).any(), "some tokens must run packed passes 1 and 2"
    assert torch.equal(out.latent_steps.long(), want.latent_steps)
    assert max_abs(out.lm_loss, want.lm_loss) < 1e-4
    assert max_abs(out.loss, want.loss) < 1e-4
    model.train()
    out = model(ids, positions(), labels=labels)
    want = ref_adaptive(model, ids, labels)
    _assert_grads_close(
        model,
        out.loss.mean(),
        want.loss.mean(),
        GRAD_PARAMS + ["halting_router.weight", "halting_router.bias"],
    )


# ----------------------------------------------------------------------------------------------
# Attention backends: each against the dense reference, with every kind of mask the model uses


def _backend_model(backend: str, **fields):
    model = build(lcot_config(core_attention_backend=backend, **fields))
    return model


@pytest.mark.parametrize("mode", ["vanilla", "stepwise", "adaptive", "interleaved"])
def test_sdpa_backend_equals_dense_reference(batch, mode):  # noqa: F811
    """Proves the sdpa backend (is_causal for step 0 and vanilla, a per-pass mask for later
    passes, per-sequence masks of packed queries) equals the dense materialised-mask attention:
    logits and gradients of the same weights in every mode."""
    ids, labels = batch
    fields = MODE_FIELDS[mode]
    models = {backend: _backend_model(backend, **fields) for backend in ("sdpa", "dense")}
    if mode == "adaptive":
        decisive_router(models["sdpa"])
    models["dense"].load_state_dict(models["sdpa"].state_dict())
    losses, grads = {}, {}
    for backend, model in models.items():
        model.train()
        loss = model(ids, positions(), labels=labels).loss.mean()
        params = [dict(model.named_parameters())[name] for name in GRAD_PARAMS]
        losses[backend], grads[backend] = loss.item(), torch.autograd.grad(loss, params)
    assert abs(losses["sdpa"] - losses["dense"]) < 1e-5
    for name, got, want in zip(GRAD_PARAMS, grads["sdpa"], grads["dense"]):
        assert (got - want).norm() / want.norm() < 1e-5, name


@pytest.mark.parametrize("mode", ["vanilla", "stepwise", "adaptive"])
def test_flex_backend_forward_equals_dense_reference(batch, mode):  # noqa: F811
    """Proves the flex backend's block masks (from LatentPass.mask_mod, packed queries
    included) select the same keys as the dense reference. PyTorch 2.13 runs FlexAttention on
    CPU forward only, so this compares logits; training with flex needs CUDA."""
    ids, _ = batch
    fields = MODE_FIELDS[mode]
    flex = _backend_model("flex", **fields)
    dense = _backend_model("dense", **fields)
    if mode == "adaptive":
        decisive_router(flex)
    dense.load_state_dict(flex.state_dict())
    with torch.no_grad():
        got, want = flex(ids, positions()).logits, dense(ids, positions()).logits
    assert max_abs(got, want) < 1e-4


FLAGS = [
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--seq-length",
    "16",
    "--train-iters",
    "1",
    "--mock-data",
]


def test_attention_and_recompute_flags_reach_the_config(capsys, monkeypatch):
    """Proves --attention-backend and --recompute-granularity arrive in LcotConfig by field name
    (RunConfig.from_values), that `selective` leaves megatron-core's own recompute off (ours
    wraps the core attention), and that a wrong backend is refused by argparse naming the flag."""
    from megatron_lcot.arguments import ArgumentError, parse_args
    from megatron_lcot.run_config import RunConfig

    monkeypatch.setenv("WORLD_SIZE", "2")
    args = parse_args(
        FLAGS
        + [
            "--attention-backend",
            "dense",
            "--recompute-granularity",
            "selective",
            "--latent-steps",
            "2",
            "--vocab-size",
            "128",
        ]
    )
    config = RunConfig.from_values(args).model.lcot_config()
    assert (config.core_attention_backend, config.latent_recompute) == ("dense", "selective")
    assert config.recompute_granularity is None
    with pytest.raises(ArgumentError, match="--recompute-granularity full is not supported yet with latent"):
        parse_args(
            FLAGS
            + [
                "--recompute-granularity",
                "full",
                "--latent-steps",
                "1",
                "--pipeline-model-parallel-size",
                "2",
                "--global-batch-size",
                "4",
            ]
        )
    with pytest.raises(SystemExit):
        parse_args(FLAGS + ["--attention-backend", "flash3"])
    assert "--attention-backend: invalid choice: 'flash3'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Recompute


@pytest.mark.parametrize("granularity", ["selective", "full"])
@pytest.mark.parametrize("mode", ["vanilla", "stepwise", "adaptive", "interleaved"])
def test_recompute_gradients_equal_no_recompute(batch, mode, granularity):  # noqa: F811
    """Proves --recompute-granularity leaves the loss and every gradient unchanged (relative
    error < 1e-6) in every mode: full wraps each latent pass, selective each core attention call
    (expose + attention), in a non-reentrant checkpoint whose recompute rewrites its own
    KV-store entry."""
    ids, labels = batch
    fields = MODE_FIELDS[mode]
    plain = build(lcot_config(**fields)).train()
    recomputed = build(lcot_config(latent_recompute=granularity, **fields)).train()
    if mode == "adaptive":
        decisive_router(plain)
    recomputed.load_state_dict(plain.state_dict())
    names = [n for n, _ in plain.named_parameters()]
    grads = {}
    for key, model in (("plain", plain), ("recomputed", recomputed)):
        loss = model(ids, positions(), labels=labels).loss.mean()
        loss.backward()
        grads[key] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads["plain"][0] == pytest.approx(grads["recomputed"][0], rel=1e-6)
    for name in names:
        want, got = grads["plain"][1][name], grads["recomputed"][1][name]
        assert (got - want).norm() <= 1e-6 * want.norm() + 1e-12, (
            f"{name}: {(got - want).norm() / want.norm():.2e}"
        )


# ----------------------------------------------------------------------------------------------
# The benchmark


@pytest.mark.parametrize("penalty_fraction", ["1", "0.25"])
def test_train_throughput_benchmark_smoke(penalty_fraction):
    """The benchmark runs end to end at a tiny size (no timing asserted) and its last line is the
    JSON summary with a ratio for every target of docs/benchmarks.md; the FLOPs it logs are the
    FLOPs it executes, with the recipe's penalty sample too (the loop's halting settings)."""
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO_ROOT, "benchmarks", "train_throughput.py"),
            "--size",
            "tiny",
            "--num-layers",
            "1",
            "--seq-length",
            "32",
            "--micro-batch-size",
            "2",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--halting-penalty-fraction",
            penalty_fraction,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **{
                k: v
                for k, v in os.environ.items()
                if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
            },
            "PYTHONPATH": REPO_ROOT,
            "OMP_NUM_THREADS": "1",
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["vanilla_vs_baseline"] > 0
    assert set(summary["fixed_k_vs_ideal"]) == {"stepwise K=1", "stepwise K=2", "interleaved K=1 J=2"}
    assert set(summary["adaptive_all_vs_ideal"]) == {"adaptive K=2 all", "adaptive K=3 all"}
    counted_vs_logged = summary["counted_vs_logged_flops"]
    assert set(counted_vs_logged) == {
        f"adaptive K={k} {profile}" for k in (2, 3) for profile in ("all", "50%", "80%", "router")
    }
    assert all(0.98 <= ratio <= 1.02 for ratio in counted_vs_logged.values()), counted_vs_logged
    assert {"adaptive K=2 50%", "adaptive K=2 80%", "adaptive K=3 80%"} <= set(
        summary["adaptive_saving_vs_flop_saving"]
    )
    rows = summary["rows"]
    assert rows["adaptive K=3 80%"]["step_shares"][1] == pytest.approx(0.2, abs=0.1)
    assert all(row["memory_mib"] > 0 for row in rows.values())
