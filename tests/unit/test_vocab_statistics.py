"""The forward-only vocabulary statistics (gold log-probability, entropy) equal torch's
log-softmax on the whole vocabulary, in one process and over two tensor-parallel shards."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_lcot import parallel
from megatron_lcot.model import vocab_statistics
from megatron_lcot.runs import REPO_ROOT, subprocess_env

VOCAB, TOKENS = 96, 10


def reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple:
    log_p = torch.log_softmax(logits.double(), -1)
    gold = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return gold, -(log_p.exp() * log_p).sum(-1)


def sample(seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(TOKENS, VOCAB, generator=gen)
    return logits, torch.randint(0, VOCAB, (TOKENS,), generator=gen)


def test_one_shard_equals_log_softmax():
    parallel.initialize(1, 1, seed=3)
    logits, labels = sample()
    gold, entropy = reference(logits, labels)
    assert torch.allclose(vocab_statistics.gold_log_probs(logits, labels).double(), gold, atol=1e-5)
    assert torch.allclose(vocab_statistics.entropy(logits).double(), entropy, atol=1e-5)


WORKER = textwrap.dedent(
    """
    import json, sys, torch
    from megatron.core import parallel_state
    from megatron_lcot import parallel
    from megatron_lcot.model import vocab_statistics
    sys.path.insert(0, {tests!r})
    from test_vocab_statistics import sample

    parallel.initialize(tensor_model_parallel_size=2, seed=3)
    rank = parallel_state.get_tensor_model_parallel_rank()
    logits, labels = sample()
    shard = logits.chunk(2, dim=-1)[rank]  # labels stay global ids, as the output layer's
    gold = vocab_statistics.gold_log_probs(shard, labels)
    entropy = vocab_statistics.entropy(shard)
    if rank == 0:
        json.dump({{"gold": gold.tolist(), "entropy": entropy.tolist()}}, open(sys.argv[1], "w"))
    parallel.destroy()
    """
)


@pytest.mark.slow
def test_two_shards_equal_log_softmax(tmp_path):
    """Labels in either shard (the sample has both): the -inf gold entry of the other shard and
    the per-shard normalisers combine exactly."""
    logits, labels = sample()
    assert (labels < VOCAB // 2).any() and (labels >= VOCAB // 2).any()
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=f"{REPO_ROOT}/tests/unit"))
    out = tmp_path / "out.json"
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script), str(out)],
        env=subprocess_env(),
        check=True,
        timeout=300,
    )
    got = json.loads(out.read_text())
    gold, entropy = reference(logits, labels)
    assert torch.allclose(torch.tensor(got["gold"], dtype=torch.double), gold, atol=1e-5)
    assert torch.allclose(torch.tensor(got["entropy"], dtype=torch.double), entropy, atol=1e-5)
