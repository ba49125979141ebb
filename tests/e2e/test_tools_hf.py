"""The conversion, generation and evaluation CLIs end to end on checkpoints trained a few steps:
evaluate.py --load and --hf on the exported copy agree, task scoring matches a hand computation,
generate.py prints what the Python API generates, and bad input fails early with exit status 2,
a message naming the flag or file, and nothing half-written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.unit.hf_fixtures import tool_env

TASK = [
    {"context": "The Congress of the United", "choices": [" States", " banana", " of the"], "answer": 0},
    {"context": "We have paid our debts and our", "choices": [" taxes", " war"], "answer": 1},
    {"context": "Fellow-Citizens of the Senate and House of", "target": " Representatives"},
]


def _tool(name: str, *arguments, cwd, timeout: int = 600):
    return subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tools", name), *map(str, arguments)],
        cwd=cwd,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _last_json(run) -> dict:
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exports(trained_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("tool_exports")
    for mode in ("vanilla", "adaptive"):
        _last_json(
            _tool(
                "convert_checkpoint.py",
                "to-hf",
                "--load",
                trained_checkpoints[mode],
                "--output",
                root / mode,
                cwd=root,
            )
        )
    return root


@pytest.fixture(scope="module")
def held_out_text(sotu_indexed_dataset, tmp_path_factory) -> str:
    speeches = os.path.join(os.path.dirname(sotu_indexed_dataset["prefix"]), "speeches")
    path = tmp_path_factory.mktemp("eval") / "held_out.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for index in (38, 39):
            text = open(os.path.join(speeches, f"{index:03d}.txt"), encoding="utf-8").read()[:2500]
            f.write(json.dumps({"body": text}) + "\n")
    return str(path)


@pytest.mark.parametrize("mode", ["vanilla", "adaptive"])
def test_evaluate_perplexity_equals_exported_copy(
    trained_checkpoints, exports, held_out_text, tmp_path, mode
):
    ours = _last_json(
        _tool(
            "evaluate.py",
            "--load",
            trained_checkpoints[mode],
            "--input",
            held_out_text,
            "--json-key",
            "body",
            "--stride",
            48,
            cwd=tmp_path,
        )
    )
    theirs = _last_json(
        _tool(
            "evaluate.py",
            "--hf",
            exports / mode,
            "--input",
            held_out_text,
            "--json-key",
            "body",
            "--seq-length",
            64,
            "--stride",
            48,
            cwd=tmp_path,
        )
    )
    print(f"{mode}: ppl {ours['perplexity']:.6f} (ours) vs {theirs['perplexity']:.6f} (transformers)")
    assert ours["tokens"] == theirs["tokens"] > 1000
    assert math.isclose(ours["perplexity"], theirs["perplexity"], rel_tol=1e-5)
    assert math.isclose(sum(ours["halted_share"]), 1.0, abs_tol=1e-9)
    assert ours["mean_latent_steps"] == pytest.approx(theirs["mean_latent_steps"])
    assert 1 < ours["perplexity"] < 512  # learned something: better than uniform over the vocabulary


@pytest.mark.slow
def test_task_scores_match_hand_computation_and_exported_copy(trained_checkpoints, exports, tmp_path):
    from megatron_lcot.inference.loading import load_trained_model

    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(record) + "\n" for record in TASK))
    ours = _last_json(
        _tool("evaluate.py", "--load", trained_checkpoints["adaptive"], "--task", task, cwd=tmp_path)
    )
    theirs = _last_json(
        _tool("evaluate.py", "--hf", exports / "adaptive", "--task", task, "--seq-length", 64, cwd=tmp_path)
    )
    for key in ("accuracy", "accuracy_norm", "cloze_accuracy"):
        assert ours[key] == theirs[key]
    assert math.isclose(ours["cloze_target_perplexity"], theirs["cloze_target_perplexity"], rel_tol=1e-5)

    trained = load_trained_model(trained_checkpoints["adaptive"])  # by hand: full forward, sum of log-probs
    tokenize = trained.tokenizer.tokenize

    def loglik(context, continuation):
        whole, head = tokenize(context + continuation), tokenize(context)
        with torch.no_grad():
            logits = trained.model(torch.tensor([whole]), torch.arange(len(whole))[None]).logits[
                0, :, : trained.vocab_size
            ]
        logprobs = torch.log_softmax(logits, -1)
        return sum(float(logprobs[i - 1, whole[i]]) for i in range(len(head), len(whole))), len(whole) - len(
            head
        )

    correct = correct_norm = 0
    for record in TASK[:2]:
        scores = [loglik(record["context"], choice)[0] for choice in record["choices"]]
        normed = [score / len(choice) for score, choice in zip(scores, record["choices"])]
        correct += scores.index(max(scores)) == record["answer"]
        correct_norm += normed.index(max(normed)) == record["answer"]
    cloze, count = loglik(TASK[2]["context"], TASK[2]["target"])
    assert ours["accuracy"] == correct / 2 and ours["accuracy_norm"] == correct_norm / 2
    assert math.isclose(ours["cloze_target_perplexity"], math.exp(-cloze / count), rel_tol=1e-5)


@pytest.mark.slow
def test_generate_cli_prints_what_the_api_generates(trained_checkpoints, tmp_path):
    """Streamed (--batch-size 1) and batched, stdout is each prompt + its completion + '---', then
    the JSON line; both equal the Python API's tokens and texts."""
    from megatron_lcot.inference.generation import generate
    from megatron_lcot.inference.loading import load_trained_model
    from megatron_lcot.inference.sampling import SamplingParams

    prompts = ["The Congress of the United States", "War"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    expected = generate(
        load_trained_model(trained_checkpoints["stepwise"]), prompts, 8, SamplingParams(greedy=True)
    )
    for batch_size in (1, 2):
        run = _tool(
            "generate.py",
            "--load",
            trained_checkpoints["stepwise"],
            "--input-file",
            tmp_path / "prompts.txt",
            "--temperature",
            0,
            "--max-new-tokens",
            8,
            "--batch-size",
            batch_size,
            cwd=tmp_path,
        )
        summary = _last_json(run)
        assert summary["tokens"] == expected.tokens and summary["texts"] == expected.texts
        printed = run.stdout.rstrip("\n").rsplit("\n", 1)[0] + "\n"  # all but the JSON line
        assert printed == "".join(f"{prompt}{text}\n---\n" for prompt, text in zip(prompts, expected.texts))
        assert summary["mean_latent_steps"] == 2.0 and summary["decode_tokens_per_s"] > 0
        assert summary["latent_steps"] == [[2.0] * len(row) for row in expected.tokens]
        assert "latent steps per generated token: mean 2.00 | 0:0.00 1:0.00 2:1.00" in run.stderr


def _fails(run, *phrases):
    assert run.returncode == 2, run.stderr[-3000:]
    message = run.stderr.strip().splitlines()[-1]
    for phrase in phrases:
        assert phrase in message, message
    return message


@pytest.mark.slow
def test_bad_input_fails_early_and_writes_nothing(trained_checkpoints, exports, tmp_path):
    import shutil

    _fails(
        _tool(
            "convert_checkpoint.py",
            "to-hf",
            "--load",
            tmp_path / "nowhere",
            "--output",
            tmp_path / "out",
            cwd=tmp_path,
        ),
        "convert_checkpoint.py: error:",
        "--load",
        "no such directory",
    )
    partial = tmp_path / "partial"
    shutil.copytree(trained_checkpoints["vanilla"], partial)
    (partial / "latest_checkpointed_iteration.txt").write_text("9")
    _fails(
        _tool(
            "convert_checkpoint.py", "to-hf", "--load", partial, "--output", tmp_path / "out", cwd=tmp_path
        ),
        "iteration 9",
    )
    assert not os.path.exists(tmp_path / "out")
    before = sorted(os.listdir(exports / "vanilla"))
    _fails(
        _tool(
            "convert_checkpoint.py",
            "to-hf",
            "--load",
            trained_checkpoints["vanilla"],
            "--output",
            exports / "vanilla",
            cwd=tmp_path,
        ),
        "already holds a model",
    )
    assert sorted(os.listdir(exports / "vanilla")) == before
    _fails(
        _tool(
            "evaluate.py",
            "--load",
            trained_checkpoints["vanilla"],
            "--task",
            tmp_path / "missing.jsonl",
            cwd=tmp_path,
        ),
        "--task",
        "no such file",
    )
    bad_task = tmp_path / "bad.jsonl"
    bad_task.write_text('{"context": "a", "choices": ["b", "c"], "answer": 5}\n')
    _fails(
        _tool("evaluate.py", "--load", trained_checkpoints["vanilla"], "--task", bad_task, cwd=tmp_path),
        "line 1",
    )
    _fails(
        _tool(
            "generate.py",
            "--load",
            trained_checkpoints["vanilla"],
            "--prompt",
            "x",
            "--top-p",
            0,
            cwd=tmp_path,
        ),
        "--top-p",
    )
