"""The entropy router's vocab-parallel entropy equals the entropy of torch's softmax over the
whole vocabulary, in one process and over two tensor-parallel shards."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_lcot import parallel
from megatron_lcot.model.vocab_entropy import vocab_parallel_entropy
from megatron_lcot.runs import REPO_ROOT, subprocess_env

VOCAB, TOKENS = 96, 10
# fp32: the entropy is log Z minus the mean logit, each about 10 here; their difference keeps
# about 1e-5 of absolute precision
ATOL = 5e-5


def reference(logits: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(logits.double(), -1)
    return -(log_p.exp() * log_p).sum(-1)


def sample_logits(seed: int = 0) -> torch.Tensor:
    """Logits whose two vocabulary halves differ in scale, so that each shard's share of the
    normaliser matters."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(TOKENS, VOCAB, generator=gen) * torch.tensor(
        [4.0] * (VOCAB // 2) + [1.0] * (VOCAB // 2)
    )


def test_one_shard_equals_the_softmax_entropy():
    parallel.initialize(1, 1, seed=3)
    logits = sample_logits()
    assert torch.allclose(vocab_parallel_entropy(logits).double(), reference(logits), atol=ATOL)


WORKER = textwrap.dedent(
    """
    import json, sys
    from megatron.core import parallel_state
    from megatron_lcot import parallel
    from megatron_lcot.model.vocab_entropy import vocab_parallel_entropy
    sys.path.insert(0, {tests!r})
    from test_vocab_entropy import sample_logits

    parallel.initialize(tensor_model_parallel_size=2, seed=3)
    rank = parallel_state.get_tensor_model_parallel_rank()
    entropy = vocab_parallel_entropy(sample_logits().chunk(2, dim=-1)[rank])
    if rank == 0:
        json.dump(entropy.tolist(), open(sys.argv[1], "w"))
    parallel.destroy()
    """
)


@pytest.mark.slow
def test_two_shards_equal_the_softmax_entropy(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=f"{REPO_ROOT}/tests/unit"))
    out = tmp_path / "out.json"
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script), str(out)],
        env=subprocess_env(),
        check=True,
        timeout=300,
    )
    got = torch.tensor(json.loads(out.read_text()), dtype=torch.double)
    assert torch.allclose(got, reference(sample_logits()), atol=ATOL)
