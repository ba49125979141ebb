"""Shared fixtures: the repository root, a real indexed dataset, running pretrain_lcot.py.

Real data for every test that trains on text: State of the Union addresses from the `sotu`
package, a sentencepiece model trained on some of them, written as a Megatron indexed dataset
(.bin/.idx) once per test run, even when pytest-xdist splits the run over several workers
(`built_once`).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys

import pytest
from filelock import FileLock

from megatron_lcot import runs
from megatron_lcot.runs import read_metrics, subprocess_env  # noqa: F401  (read_metrics: for the tests)

# The session fixtures of these helper modules are registered here, once: a fixture imported
# into several test modules is registered, and built, once per importing module.
pytest_plugins = ("tests.unit.hf_fixtures", "tests.unit.preprocess_helpers")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = runs.PRETRAIN_SCRIPT

# A model small enough that a training step takes milliseconds on a CPU core.
TINY_MODEL_FLAGS = [
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--num-query-groups",
    "2",
    "--ffn-hidden-size",
    "128",
    "--seq-length",
    "64",
]


def corpus_flags(dataset: dict, tmp_path) -> list:
    """pretrain_lcot.py's data flags for the `sotu_indexed_dataset` fixture (its prefix and
    tokenizer, a 98/2/0 split), the index cache under `tmp_path`."""
    return [
        "--data-path",
        dataset["prefix"],
        "--split",
        "98,2,0",
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        dataset["tokenizer_model"],
        "--data-cache-path",
        str(tmp_path / "cache"),
    ]


def sotu_speeches(count: int) -> list:
    """The first `count` State of the Union addresses (chronological), stage notes removed."""
    from megatron_lcot.data.default_corpus import sotu_speeches as all_speeches

    return list(itertools.islice(all_speeches(), count))


def built_once(tmp_path_factory, name: str, build) -> dict:
    """`build(directory)`'s JSON-able result, built once per test run.

    Without pytest-xdist: `build` in a fresh temporary directory. Under xdist every worker is a
    session of its own, so the first worker to get here builds under the directory the workers
    share and writes the result next to it; the others wait on its lock and read the result.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent
    result_file = shared / f"{name}.json"
    with FileLock(str(shared / f"{name}.lock")):
        if result_file.is_file():
            return json.loads(result_file.read_text())
        directory = shared / name
        shutil.rmtree(directory, ignore_errors=True)  # left by a worker whose build failed
        directory.mkdir()
        result = build(directory)
        result_file.write_text(json.dumps(result))
        return result


@pytest.fixture(scope="session")
def sotu_indexed_dataset(tmp_path_factory) -> dict:
    """{"prefix": path prefix of a .bin/.idx pair, "tokenizer_model": sentencepiece .model}.

    40 addresses (~300k tokens), one document each, tokenized by tools/preprocess_data.py
    with a 512-piece sentencepiece BPE trained on them, each document ending with eod.
    """
    return built_once(tmp_path_factory, "sotu", _build_sotu_indexed_dataset)


def _build_sotu_indexed_dataset(root) -> dict:
    from megatron_lcot.data.tokenizer_training import train_sentencepiece

    texts = sotu_speeches(40)
    (root / "speeches").mkdir()
    for index, text in enumerate(texts):
        (root / "speeches" / f"{index:03d}.txt").write_text(text, encoding="utf-8")
    model_path = train_sentencepiece(texts, str(root / "sotu_sp512"), vocab_size=512)
    subprocess.run(
        [
            sys.executable,
            os.path.join(REPO_ROOT, "tools", "preprocess_data.py"),
            "--input",
            str(root / "speeches"),
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            model_path,
            "--output-prefix",
            str(root / "sotu"),
            "--append-eod",
            "--workers",
            "1",
        ],
        check=True,
        capture_output=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": REPO_ROOT},
    )
    return {"prefix": str(root / "sotu_text_document"), "tokenizer_model": model_path}


def read_checkpoint_weights(iteration_dir, tmp_path) -> dict:
    """The full (unsharded) weights of a checkpoint iteration directory, read from its
    dist_checkpointing `model/` directory without a process group; None-valued entries dropped."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(str(tmp_path), f"weights_{abs(hash(str(iteration_dir)))}.pt")
    dcp_to_torch_save(os.path.join(str(iteration_dir), "model"), out)
    return {k: v for k, v in torch.load(out, weights_only=True).items() if isinstance(v, torch.Tensor)}


def nested_tensors(value, path: str = "") -> dict:
    """Every tensor inside nested dicts/lists/tuples (e.g. an optimizer state), by its path."""
    import torch

    if isinstance(value, torch.Tensor):
        return {path: value}
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, (list, tuple))
        else ()
    )
    return {
        key: tensor for name, item in items for key, tensor in nested_tensors(item, f"{path}/{name}").items()
    }


def tool_env() -> dict:
    """Environment for a tool or training subprocess (`megatron_lcot.runs.subprocess_env`: one
    OpenMP thread, this repository first on the path, no inherited torch.distributed rendezvous
    variables, which a test that initialised torch.distributed in-process still holds)."""
    return subprocess_env()


def run_pretrain(
    flags: list, cwd, launcher: tuple = (sys.executable,), timeout: int = 300, script: str = PRETRAIN
):
    """Run pretrain_lcot.py (or a script with its command line) with `flags` in a subprocess
    (`tool_env`); returns the CompletedProcess with text stdout/stderr."""
    return runs.run_pretrain(
        flags, cwd=cwd, launcher=launcher, env=tool_env(), timeout=timeout, script=script
    )
