"""The memory model (model/memory.py) against the model it describes (fp32, CPU): parameter
counts against the built model, saved activations against the bytes autograd keeps (every
storage a saved_tensors_hooks pack hook sees, parameters excluded), and the example config
against an 80 GB GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_lcot.model.memory import TrainingShape, activation_bytes, model_state_bytes, parameter_count
from tests.reference.helpers import init_megatron, single_thread_fixture

_single_thread = single_thread_fixture()

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = dict(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=256)
TOKENS, BATCH, VOCAB = 64, 2, 512
# (LcotConfig fields, TrainingShape fields) of each mode; adaptive with tau = 0: every token runs
MODES = {
    "vanilla": ({}, {}),
    "stepwise": ({"latent_steps": 2}, {"latent_steps": 2}),
    "interleaved": (
        {"latent_steps": 1, "latent_layout": "interleaved", "jacobi_iters": (2,)},
        {"latent_steps": 1, "latent_layout": "interleaved", "jacobi_iters": 2},
    ),
    "adaptive": ({"latent_steps": 2, "halting": "adaptive", "halting_threshold": 0.0}, {"latent_steps": 2}),
}


def _small_model(fields):
    from megatron_lcot.model import build_lcot_model
    from megatron_lcot.model.config import llama_config

    init_megatron(1)
    model = build_lcot_model(llama_config(**SMALL, **fields), vocab_size=VOCAB, max_sequence_length=TOKENS)
    return model.train()


def _small_shape(**fields) -> TrainingShape:
    return TrainingShape(
        **SMALL, seq_length=TOKENS, micro_batch_size=BATCH, vocab_size=VOCAB, device="cpu", **fields
    )


def saved_activation_bytes(model) -> int:
    """Bytes of the distinct storages autograd saves in one training forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(ids, torch.arange(TOKENS).expand(BATCH, TOKENS), labels=ids)
    return sum(saved.values())


@pytest.mark.parametrize("mode", list(MODES))
def test_activation_estimate_matches_saved_tensors(mode):
    """Proves the activation model (per layer and pass, the attention call's keys/values and
    mask, final norms, logits) is within 10% of what autograd keeps in each mode."""
    model_fields, shape_fields = MODES[mode]
    measured = saved_activation_bytes(_small_model(model_fields))
    estimate = activation_bytes(_small_shape(**shape_fields))["total"]
    assert 0.9 <= estimate / measured <= 1.1, (mode, estimate, measured)


def test_parameter_count_matches_the_model():
    """Proves the parameter formula (GQA QKV, SwiGLU, norms, untied embedding and output
    layer, router) equals the built model's parameter count exactly."""
    model = _small_model({"latent_steps": 2, "halting": "adaptive"})
    counts = parameter_count(_small_shape(latent_steps=2, halting="adaptive"))
    assert counts["layers"] + counts["embedding"] + counts["router"] == sum(
        p.numel() for p in model.parameters()
    )


def test_model_states_follow_the_zero_accounting():
    """Proves bytes per parameter of each layout (bf16, DP = 8): megatron DDP 2 + 4 + 12,
    distributed optimizer 2 + 4 + 12/8, ZeRO-1 2 + 2 + 12/8, ZeRO-2 2 + 14/8, ZeRO-3 16/8."""
    want = {(None, False): 18, (None, True): 7.5, (1, False): 5.5, (2, False): 3.75, (3, False): 2.0}
    for (stage, distributed), per_param in want.items():
        shape = _small_shape(bf16=True, data_parallel=8, zero_stage=stage, distributed_optimizer=distributed)
        states = model_state_bytes(shape)
        got = (states["weights"] + states["gradients"] + states["optimizer"]) / states["parameters"]
        assert got == pytest.approx(per_param), (stage, distributed)


def test_fused_attention_keeps_no_score_matrix():
    """Proves the CUDA estimate of the example's stepwise passes holds no [T, (k+1) T] score
    matrix: the dense reference call adds it, the fused calls stay linear in T."""
    shape = dict(SMALL, seq_length=2048, micro_batch_size=BATCH, vocab_size=VOCAB, latent_steps=2, bf16=True)
    fused = activation_bytes(TrainingShape(**shape))["layers"]
    dense = activation_bytes(TrainingShape(**shape, attention_backend="dense"))["layers"]
    assert dense > 3 * fused


def test_example_defaults_fit_an_80gb_gpu():
    """Proves examples/pretrain_common.sh's defaults fit 80 GB by the model, on one GPU and on
    the single-node script's 8 (ZeRO-2), through the command-line tool."""
    for gpus in (1, 8):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "megatron_lcot.training.memory_estimate",
                "--example",
                "--gpus",
                str(gpus),
                "--json",
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        estimate = json.loads(out.stdout.strip().splitlines()[-1])
        assert estimate["shape"]["zero_stage"] == 2 and estimate["shape"]["data_parallel"] == gpus
        assert estimate["shape"]["latent_steps"] == 2 and estimate["shape"]["bf16"]
        assert estimate["peak"] < 80e9, estimate["peak"]
