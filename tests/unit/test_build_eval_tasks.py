"""tools/build_eval_tasks.py: BIG-bench task JSON -> multiple-choice records, held-out cloze
records; the files are what tools/evaluate.py --task reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

from tests.conftest import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))

TOOL = os.path.join(REPO_ROOT, "tools", "build_eval_tasks.py")

# Shaped like BIG-bench's task.json (hyperbaton's fields), two examples, one with a tie.
TASK = {
    "name": "hyperbaton",
    "task_prefix": "Which sentence has the correct adjective order?",
    "examples": [
        {"input": "a) big red car b) red big car", "target_scores": {"a": 1, "b": 0}},
        {"input": "a) x b) y", "target_scores": {"a": 1, "b": 1}},
        {"input": "a) old wooden box b) wooden old box", "target_scores": {"a": 0, "b": 1}},
    ],
}


def test_multiple_choice_items_follow_bigbench_prefixes_and_scores():
    from build_eval_tasks import multiple_choice_items

    items = multiple_choice_items(TASK)
    assert items == [
        {
            "context": "Which sentence has the correct adjective order?\nQ: a) big red car b) red big car\nA: ",
            "choices": [" a", " b"],
            "answer": 0,
        },
        {
            "context": "Which sentence has the correct adjective order?\nQ: a) old wooden box b) wooden old box\nA: ",
            "choices": [" a", " b"],
            "answer": 1,
        },
    ]  # the tied example is dropped: no unique gold


def test_subtasks_are_taken_in_turn_so_a_limited_sample_covers_each():
    from build_eval_tasks import interleaved

    singular, plural = [f"s{i}" for i in range(3)], ["p0"]
    assert interleaved([singular, plural]) == ["s0", "p0", "s1", "s2"]
    assert interleaved([singular, [], plural])[:2] == ["s0", "p0"]


def test_cli_reads_the_sdist_and_writes_files_evaluate_accepts(tmp_path):
    source = tmp_path / "bigbench-1.0.0"
    task_dir = source / "bigbench" / "benchmark_tasks" / "hyperbaton"
    task_dir.mkdir(parents=True)
    (task_dir / "task.json").write_text(json.dumps(TASK))
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        archive.add(source, arcname="bigbench-1.0.0")
    out = tmp_path / "tasks"
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    result = subprocess.run(
        [
            sys.executable,
            TOOL,
            "--output-dir",
            out,
            "--bigbench",
            sdist,
            "--tasks",
            "hyperbaton",
            "--cloze-items",
            "40",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["items"] == {
        "bigbench_hyperbaton.jsonl": 2,
        "cloze_heldout.jsonl": 40,
    }
    from evaluate import read_task

    assert len(read_task(str(out / "bigbench_hyperbaton.jsonl"))) == 2
    cloze = read_task(str(out / "cloze_heldout.jsonl"))

    from build_eval_tasks import held_out_documents

    from megatron_lcot.data.default_corpus import default_documents

    held_out = [" ".join(d.split()) for d in held_out_documents("98,2,0")]
    documents = default_documents()
    assert len(held_out) == round(0.02 * len(documents))
    training = {" ".join(d.split()) for d in documents[: len(documents) - len(held_out)]}
    for item in cloze:  # a real last word of a held-out passage, never a training document's
        passage = item["context"] + item["target"]
        home = [d for d in held_out if passage in d]
        assert home and home[0] not in training
        assert (
            item["target"][0] == " " and item["target"][1:].isalpha() and len(item["context"].split()) >= 20
        )

    wrong = subprocess.run(
        [
            sys.executable,
            TOOL,
            "--output-dir",
            out,
            "--bigbench",
            sdist,
            "--tasks",
            "nonesuch",
            "--cloze-items",
            "0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert wrong.returncode == 2 and "build_eval_tasks.py: error: --tasks: nonesuch not found" in wrong.stderr
