"""Forward-only statistics of vocab-parallel logits, in one process and over two tensor-parallel
shards: the entropy router's entropy equals the entropy of torch's softmax over the whole
vocabulary; the penalty's gold-token NLL equals megatron-core's vocab-parallel cross-entropy
bit for bit (the hard halting decisions would amplify any rounding difference)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_lcot import parallel
from megatron_lcot.model.vocab_parallel import vocab_parallel_entropy, vocab_parallel_nll
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


def sample_targets(seed: int = 0) -> torch.Tensor:
    """[TOKENS, 1] gold ids from both vocabulary halves (both shards hold some)."""
    return torch.randint(0, VOCAB, (TOKENS, 1), generator=torch.Generator().manual_seed(seed + 1))


def test_one_shard_equals_the_softmax_entropy():
    parallel.initialize(1, 1, seed=3)
    logits = sample_logits()
    assert torch.allclose(vocab_parallel_entropy(logits).double(), reference(logits), atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_shard_nll_is_megatron_cross_entropy_bitwise(dtype):
    parallel.initialize(1, 1, seed=3)
    logits = sample_logits().to(dtype).unsqueeze(1)  # [s, b=1, V] as the output layer's
    targets = sample_targets()
    megatron = vocab_parallel_cross_entropy(logits.clone(), targets)
    assert torch.equal(vocab_parallel_nll(logits.clone(), targets), megatron)


WORKER = textwrap.dedent(
    """
    import json, sys
    from megatron.core import parallel_state
    from megatron_lcot import parallel
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron_lcot.model.vocab_parallel import vocab_parallel_entropy, vocab_parallel_nll
    sys.path.insert(0, {tests!r})
    from test_vocab_parallel import sample_logits, sample_targets

    parallel.initialize(tensor_model_parallel_size=2, seed=3)
    rank = parallel_state.get_tensor_model_parallel_rank()
    shard = sample_logits().chunk(2, dim=-1)[rank]
    entropy = vocab_parallel_entropy(shard)
    nll = vocab_parallel_nll(shard.unsqueeze(1).clone(), sample_targets())
    megatron = vocab_parallel_cross_entropy(shard.unsqueeze(1).clone(), sample_targets())
    if rank == 0:
        result = dict(entropy=entropy.tolist(), nll=nll.tolist(), megatron=megatron.tolist())
        json.dump(result, open(sys.argv[1], "w"))
    parallel.destroy()
    """
)


@pytest.mark.slow
def test_two_shards_equal_the_softmax_entropy_and_megatron_cross_entropy(tmp_path):
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
    assert torch.allclose(
        torch.tensor(got["entropy"], dtype=torch.double), reference(sample_logits()), atol=ATOL
    )
    assert got["nll"] == got["megatron"]  # bitwise: JSON keeps every float's digits
    full_nll = -torch.log_softmax(sample_logits().double(), -1).gather(-1, sample_targets())
    assert torch.allclose(torch.tensor(got["nll"], dtype=torch.double), full_nll, atol=ATOL)
