"""Build zero-shot task files for `tools/evaluate.py --task` from offline sources.

    python tools/build_eval_tasks.py --output-dir data/eval_tasks \
        [--bigbench PATH] [--tasks subject_verb_agreement,hyperbaton,...] [--max-items 500] \
        [--cloze-items 500] [--split 98,2,0]

Two kinds of files, one JSON object per line (the format `evaluate.py --task` reads):

* multiple choice `{"context": str, "choices": [str, ...], "answer": int}`, one file per
  BIG-bench task (`bigbench_<task>.jsonl`), from the task JSON inside the BIG-bench source
  distribution (`--bigbench`: the `bigbench-1.0.0.tar.gz` sdist from PyPI, e.g. fetched with
  `pip download bigbench==1.0.0 --no-deps --no-binary :all:`, or its unpacked directory). The
  context is the task's prefix + input prefix + input + output prefix (BIG-bench's defaults
  "\\nQ: " / "\\nA: "), each choice is " " + the choice text, the answer the choice with the
  highest target score. Tasks with subtasks contribute every subtask.
* cloze `{"context": str, "target": str}` (LAMBADA-style last word), `cloze_heldout.jsonl`,
  from the default corpus's *held-out* documents (the validation share of `--split`, in
  the order the default corpus writes them, so the training models never saw them): passages
  of up to 60 words ending a sentence; the target is " " + the sentence's last word.

Each item is kept or dropped deterministically: the first --max-items per task, taken in turn
from each of its subtasks. Prints one JSON
line with the files and their item counts. User mistakes print `build_eval_tasks.py: error:
...` and exit 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_TASKS = ("subject_verb_agreement", "hyperbaton", "social_iqa", "truthful_qa")
# task.json, a subtask's task.json, or a named subtask file (subject_verb_agreement/*.json)
_TASK_PATH = re.compile(r"(?:^|/)bigbench/benchmark_tasks/([^/]+)/(?:[^/]+/)?[^/]+\.json$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{3,})[.!?]$", re.S)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="build_eval_tasks.py", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    parser.add_argument("--output-dir", required=True)
    parser.add_argument(
        "--bigbench",
        default=None,
        help="bigbench-1.0.0.tar.gz (source distribution) or its unpacked directory",
    )
    parser.add_argument(
        "--tasks", default=",".join(DEFAULT_TASKS), help="BIG-bench task names, comma separated"
    )
    parser.add_argument(
        "--max-items", type=int, default=500, help="at most this many items per BIG-bench task"
    )
    parser.add_argument("--cloze-items", type=int, default=500, help="0 skips the held-out cloze file")
    parser.add_argument(
        "--split", default="98,2,0", help="the training runs' --split (held-out = its 2nd share)"
    )
    return parser


def _task_jsons(source: str, wanted: set) -> dict:
    """{task: [task.json dicts (one per subtask)]} read from the sdist or a directory."""
    found = {}

    def keep(path: str, read):
        match = _TASK_PATH.search(path.replace(os.sep, "/"))
        if match and match.group(1) in wanted:
            task = json.loads(read())
            if isinstance(task, dict) and "examples" in task:
                found.setdefault(match.group(1), []).append(task)

    if os.path.isdir(source):
        for root, _, files in os.walk(source):
            for name in files:
                path = os.path.join(root, name)
                keep(path, lambda p=path: open(p, encoding="utf-8").read())
    elif tarfile.is_tarfile(source):
        with tarfile.open(source) as archive:
            for member in archive:
                if member.isfile() and member.name.endswith(".json"):
                    keep(member.name, lambda m=member: archive.extractfile(m).read().decode("utf-8"))
    else:
        raise ValueError(
            f"--bigbench {source!r}: neither a directory nor a .tar.gz; pass the bigbench "
            "source distribution (pip download bigbench==1.0.0 --no-deps --no-binary :all:)."
        )
    return found


def multiple_choice_items(task: dict) -> list:
    """BIG-bench examples with target_scores -> {"context", "choices", "answer"} records."""
    prefix = task.get("task_prefix", "")
    input_prefix = task.get("example_input_prefix", "\nQ: ")
    output_prefix = task.get("example_output_prefix", "\nA: ")
    items = []
    for example in task.get("examples", []):
        scores = example.get("target_scores")
        if not isinstance(scores, dict) or len(scores) < 2:
            continue
        choices = list(scores)
        best = max(scores.values())
        if sum(1 for v in scores.values() if v == best) != 1:
            continue  # ambiguous gold
        context = f"{prefix}{input_prefix}{example['input']}{output_prefix}".lstrip("\n")
        items.append(
            {
                "context": context,
                "choices": [" " + c.strip() for c in choices],
                "answer": choices.index(max(choices, key=scores.get)),
            }
        )
    return items


def interleaved(subtask_items: list) -> list:
    """The items of every subtask taken in turn (each subtask's first, then each one's second, ...),
    so that the first --max-items cover every subtask. BIG-bench lists subject_verb_agreement's
    20 subtasks one after the other, and its first 500 items all have a singular subject."""
    rounds = itertools.zip_longest(*subtask_items)
    return [item for round_items in rounds for item in round_items if item is not None]


def held_out_documents(split: str) -> list:
    """The validation share of the default corpus under `--split`: megatron-core's own split
    arithmetic over the documents in the order the corpus writes them."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    from megatron_lcot.data.default_corpus import default_documents

    documents = default_documents()
    begin, end = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))[1]
    return documents[int(round(begin * len(documents))) : int(round(end * len(documents)))]


def cloze_items(documents: list, count: int, max_words: int = 60) -> list:
    """LAMBADA-style items: the context is up to `max_words` words of a document ending just
    before the last word of a sentence; the target is that word (alphabetic, >= 3 letters)."""
    items = []
    for document in documents:
        sentences = _SENTENCE_END.split(" ".join(document.split()))
        for i in range(1, len(sentences)):
            match = _LAST_WORD.match(sentences[i])
            if not match:
                continue
            words = " ".join(sentences[:i] + [match.group(1)]).split()
            if len(words) < 20:
                continue
            items.append({"context": " ".join(words[-max_words:]), "target": " " + match.group(2)})
            break  # one item per document: items from many documents
        if len(items) == count:
            break
    return items


def main(argv: list | None = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        if args.max_items < 1 or args.cloze_items < 0:
            raise ValueError("--max-items must be >= 1 and --cloze-items >= 0.")
        os.makedirs(args.output_dir, exist_ok=True)
        written = {}
        if args.bigbench:
            if not os.path.exists(args.bigbench):
                raise ValueError(f"--bigbench {args.bigbench!r}: no such file or directory.")
            wanted = [t for t in args.tasks.split(",") if t]
            tasks = _task_jsons(args.bigbench, set(wanted))
            missing = [t for t in wanted if t not in tasks]
            if missing:
                raise ValueError(
                    f"--tasks: {', '.join(missing)} not found in {args.bigbench!r}; check the names "
                    "against bigbench/benchmark_tasks/."
                )
            for name in wanted:
                items = interleaved([multiple_choice_items(task) for task in tasks[name]])[: args.max_items]
                written[f"bigbench_{name}.jsonl"] = _write(args.output_dir, f"bigbench_{name}.jsonl", items)
        if args.cloze_items:
            items = cloze_items(held_out_documents(args.split), args.cloze_items)
            written["cloze_heldout.jsonl"] = _write(args.output_dir, "cloze_heldout.jsonl", items)
    except (ValueError, FileNotFoundError) as error:
        print(f"build_eval_tasks.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"output_dir": args.output_dir, "items": written}))
    return written


def _write(directory: str, name: str, items: list) -> int:
    if not items:
        raise ValueError(f"{name}: no usable items (no example with a unique best target score).")
    with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    return len(items)


if __name__ == "__main__":
    main()
