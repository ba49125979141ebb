"""The lm-eval adapter (`megatron_lcot/inference/lm_eval_adapter.py`, model `lcot`) on a tiny
adaptive latent checkpoint (K=3, tau 0.4) trained on State of the Union text:

* `loglikelihood` equals the log-probabilities of our scorer summed by hand, and `is_greedy` an
  argmax taken by hand;
* lm-eval itself (its CLI, offline, local task YAMLs over JSON lines) reports the accuracy that
  `tools/evaluate.py --task` reports on the same items;
* `loglikelihood_rolling` equals `tools/evaluate.py --input` total NLL on the same token stream;
* a bad `load=` fails before any work with a message naming `load=`.
"""

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

LAUNCHER = os.path.join(REPO_ROOT, "tools", "lm_eval_lcot.py")
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

MC_TASK = """task: lcot_sotu_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""

CLOZE_TASK = """task: lcot_sotu_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: context
doc_to_target: target
target_delimiter: ""
metric_list:
  - metric: acc
"""

ROLLING_TASK = """task: lcot_sotu_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: byte_perplexity
"""
TEMPLATES = {"choice": MC_TASK, "cloze": CLOZE_TASK, "rolling": ROLLING_TASK}


def _held_out(sotu_indexed_dataset, index: int) -> str:
    speeches = os.path.join(os.path.dirname(sotu_indexed_dataset["prefix"]), "speeches")
    with open(os.path.join(speeches, f"{index:03d}.txt"), encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def items(sotu_indexed_dataset) -> dict:
    """{"cloze": 20 LAMBADA-style items (tools/build_eval_tasks.py) from addresses not trained on,
    "choice": the same contexts as 3-way multiple choice against the next items' last words}."""
    sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
    from build_eval_tasks import cloze_items

    paragraphs = [
        p for index in (38, 39) for p in _held_out(sotu_indexed_dataset, index).split("\n") if p.strip()
    ]
    cloze = cloze_items(paragraphs, 20, max_words=30)
    assert len(cloze) == 20
    choice = []
    for i, item in enumerate(cloze):
        wrong = [cloze[(i + j) % 20]["target"] for j in (1, 2, 3, 4, 5)]
        distractors = [w for w in dict.fromkeys(wrong) if w != item["target"]][:2]
        answer = i % 3
        choice.append(
            {
                "context": item["context"],
                "answer": answer,
                "choices": distractors[:answer] + [item["target"]] + distractors[answer:],
            }
        )
    return {"cloze": cloze, "choice": choice}


@pytest.fixture(scope="module")
def adapters(trained_checkpoints) -> dict:
    """{mode: LcotLM}, built on first use."""
    from megatron_lcot.inference.lm_eval_adapter import LcotLM

    class Adapters(dict):
        def __missing__(self, mode):
            self[mode] = LcotLM(load=trained_checkpoints[mode])
            return self[mode]

    return Adapters()


@pytest.fixture(scope="module")
def adapter(adapters):
    return adapters["adaptive"]


def _task_dir(tmp_path, records: dict):
    """lm-eval task YAMLs (TEMPLATES) over JSON-lines files of `records` {kind: [record, ...]}."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, kind_records in records.items():
        data = _write_jsonl(tmp_path / f"{name}.jsonl", kind_records)
        (tasks / f"{name}.yaml").write_text(TEMPLATES[name].format(data=data), encoding="utf-8")
    return tasks


def _requests(kind: str, arguments: list) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, args, index) for index, args in enumerate(arguments)]


def _write_jsonl(path, records: list) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return str(path)


def _run(command: list, cwd, timeout: int = 600):
    return subprocess.run(
        [sys.executable, *map(str, command)],
        cwd=cwd,
        env={**tool_env(), **OFFLINE},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _last_json(run) -> dict:
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _halt_half_the_tokens(model, others: list, ids: list, monkeypatch) -> None:
    """Set --halting-threshold of `model` and `others` to the median reach of the last latent step
    on `ids`, so that about half the tokens stop before it (evaluation prunes at the threshold)."""
    with torch.no_grad():
        output = model(torch.tensor([ids]), torch.arange(len(ids))[None], return_thoughts=True)
    reach = [output.thoughts.reach]
    for each in (model, *others):
        monkeypatch.setattr(each.config, "halting_threshold", float(reach[0][-1].median()))


def _greedy_items(trained, cloze: list) -> list:
    """Cloze items whose target is the one token the model predicts after the context (so that
    is_greedy / cloze accuracy is 1 on them), where that token's text splits off cleanly."""
    from megatron_lcot.inference.scoring import CheckpointScorer

    scorer, tokenizer, greedy = CheckpointScorer(trained), trained.tokenizer, []
    for item in cloze:
        head = tokenizer.tokenize(item["context"])
        logprobs, _ = scorer(torch.tensor([head[-trained.config.model.seq_length :]]))
        text = tokenizer.detokenize(head + [int(logprobs[-1].argmax())])
        if text.startswith(item["context"]) and len(text) > len(item["context"]):
            greedy.append({"context": item["context"], "target": text[len(item["context"]) :]})
    assert greedy
    return greedy


@pytest.mark.parametrize("mode", ["adaptive", "vanilla"])  # vanilla: a padded vocabulary (512 -> 576)
def test_loglikelihood_equals_the_scorer_by_hand(adapters, trained_checkpoints, items, mode, monkeypatch):
    from megatron_lcot.inference.loading import load_trained_model
    from megatron_lcot.inference.scoring import CheckpointScorer

    adapter = adapters[mode]
    trained = load_trained_model(trained_checkpoints[mode])  # a second, independent copy
    scorer, tokenize, eod = CheckpointScorer(trained), trained.tokenizer.tokenize, trained.tokenizer.eod
    seq = trained.config.model.seq_length
    if mode == "adaptive":  # 6 steps leave every gate near 0.9 (no token halts at tau 0.4): make tokens halt
        _halt_half_the_tokens(
            trained.model, [adapter.trained.model], tokenize(items["cloze"][0]["context"])[-seq:], monkeypatch
        )
    pairs = [(item["context"], choice) for item in items["choice"][:6] for choice in item["choices"]]
    pairs += [("", " The Congress"), (" ".join(item["context"] for item in items["cloze"][:4]), " nation")]
    pairs += [(item["context"], item["target"]) for item in _greedy_items(trained, items["cloze"][:6])]

    results = adapter.loglikelihood(_requests("loglikelihood", pairs))

    expected, steps = [], set()
    for context, continuation in pairs:
        whole, head = tokenize(context + continuation), tokenize(context)
        assert whole[: len(head)] == head  # the split lm-eval makes: continuation = what follows the context
        ids = ([eod] if not head else []) + whole
        ids, n = ids[-seq:], len(whole) - len(head)
        logprobs, executed = scorer(torch.tensor([ids]))
        steps.update(executed.tolist())
        targets = range(len(ids) - n, len(ids))
        expected.append(
            (
                sum(float(logprobs[i - 1, ids[i]]) for i in targets),
                all(int(logprobs[i - 1].argmax()) == ids[i] for i in targets),
            )
        )
    assert len(results) == len(expected) and len(pairs) > 20
    for (loglik, greedy), (want, want_greedy) in zip(results, expected):
        assert loglik == pytest.approx(want, abs=1e-5) and greedy == want_greedy
    greedy_flags = [g for _, g in expected]
    assert any(greedy_flags) and not all(greedy_flags)  # both outcomes are exercised
    assert (
        len(steps) > 1 if mode == "adaptive" else steps == {0.0}
    )  # adaptive: tokens halted at different steps


def test_loglikelihood_rolling_equals_evaluate_input(
    adapter, trained_checkpoints, sotu_indexed_dataset, tmp_path
):
    """evaluate.py's stream for the records ["", text] is [eod] + tokens(text) + [eod]: its windows
    depend only on positions, so its total NLL is the adapter's rolling NLL of `text` (stream
    [eod] + tokens(text)) plus the trailing eod's NLL, computed here by one forward pass."""
    text = _held_out(sotu_indexed_dataset, 38)[:1500]
    seq, stride = adapter.seq_length, adapter.stride
    ours = adapter.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))[0]
    evaluated = _last_json(
        _run(
            [
                os.path.join(REPO_ROOT, "tools", "evaluate.py"),
                "--load",
                trained_checkpoints["adaptive"],
                "--input",
                _write_jsonl(tmp_path / "doc.jsonl", [{"text": ""}, {"text": text}]),
                "--stride",
                stride,
            ],
            cwd=tmp_path,
        )
    )
    tokens = adapter.tokenize(text)
    n = len(tokens) + 1  # index of the trailing eod in evaluate.py's stream
    assert evaluated["tokens"] == n and evaluated["seq_length"] == seq and n > 4 * seq
    stream = [adapter.eod, *tokens]
    begin = next(w * stride for w in range(n) if w * stride + seq > n)  # the window that scores target n
    with torch.no_grad():
        window = torch.tensor([stream[begin:]])
        logits = adapter.trained.model(window, torch.arange(window.shape[1])[None]).logits[
            0, -1, : adapter.trained.vocab_size
        ]
    eod_nll = -float(torch.log_softmax(logits.float(), -1)[adapter.eod])
    assert -ours + eod_nll == pytest.approx(evaluated["nll"] * n, rel=1e-6)


def test_simple_evaluate_equals_our_task_scores(
    adapter, trained_checkpoints, items, sotu_indexed_dataset, monkeypatch, tmp_path
):
    """lm-eval's own pipeline in process (task YAML -> requests -> metrics), model="lcot" by name:
    acc/acc_norm equal score_task (evaluate.py --task's function) on the same items, and the
    rolling task's byte perplexity the adapter's loglikelihood_rolling over the bytes."""
    import datasets
    import lm_eval
    from lm_eval.tasks import TaskManager

    from megatron_lcot.inference.scoring import score_task

    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import: the process may have it
    documents = [{"text": _held_out(sotu_indexed_dataset, index)[:700]} for index in (38, 39)]
    records = {
        "choice": items["choice"],
        "cloze": items["cloze"] + _greedy_items(adapter.trained, items["cloze"]),
        "rolling": documents,
    }
    manager = TaskManager(include_path=str(_task_dir(tmp_path, records)), include_defaults=False)
    results = lm_eval.simple_evaluate(
        model="lcot",
        model_args={"load": trained_checkpoints["adaptive"]},
        tasks=["lcot_sotu_choice", "lcot_sotu_cloze", "lcot_sotu_rolling"],
        task_manager=manager,
    )["results"]

    ours = {
        kind: score_task(records[kind], adapter.scorer, adapter.tokenize, adapter.seq_length, adapter.eod)
        for kind in ("choice", "cloze")
    }
    assert results["lcot_sotu_choice"]["acc,none"] == ours["choice"]["accuracy"]
    assert results["lcot_sotu_choice"]["acc_norm,none"] == ours["choice"]["accuracy_norm"]
    assert results["lcot_sotu_cloze"]["acc,none"] == ours["cloze"]["cloze_accuracy"]
    assert (
        0 < ours["choice"]["accuracy"] < 1 and 0 < ours["cloze"]["cloze_accuracy"] < 1
    )  # neither is a constant
    rolling = adapter.loglikelihood_rolling(
        _requests("loglikelihood_rolling", [(d["text"],) for d in documents])
    )
    size = sum(len(d["text"].encode("utf-8")) for d in documents)
    assert results["lcot_sotu_rolling"]["byte_perplexity,none"] == pytest.approx(
        math.exp(-sum(rolling) / size), rel=1e-9
    )


@pytest.mark.slow  # lm-eval indexes its 14k built-in tasks, loads the model, scores 100 requests: ~1 min
def test_lm_eval_cli_reports_evaluate_task_accuracy(trained_checkpoints, items, tmp_path):
    from megatron_lcot.inference.loading import load_trained_model

    checkpoint = trained_checkpoints["adaptive"]
    records = {
        "choice": items["choice"],
        "cloze": items["cloze"] + _greedy_items(load_trained_model(checkpoint), items["cloze"]),
    }
    tasks = _task_dir(tmp_path, records)
    run = _run(
        [
            LAUNCHER,
            "--model",
            "lcot",
            "--model_args",
            f"load={checkpoint}",
            "--tasks",
            "lcot_sotu_choice",
            "lcot_sotu_cloze",
            "--include_path",
            tasks,
            "--output_path",
            tmp_path / "out",
        ],
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    written = [
        os.path.join(d, f) for d, _, files in os.walk(tmp_path / "out") for f in files if f.endswith(".json")
    ]
    assert len(written) == 1, written
    with open(written[0], encoding="utf-8") as f:
        results = json.load(f)["results"]

    choice = _last_json(
        _run(
            [
                os.path.join(REPO_ROOT, "tools", "evaluate.py"),
                "--load",
                checkpoint,
                "--task",
                tmp_path / "choice.jsonl",
            ],
            cwd=tmp_path,
        )
    )
    cloze = _last_json(
        _run(
            [
                os.path.join(REPO_ROOT, "tools", "evaluate.py"),
                "--load",
                checkpoint,
                "--task",
                tmp_path / "cloze.jsonl",
            ],
            cwd=tmp_path,
        )
    )
    assert choice["multiple_choice_items"] == 20 and cloze["cloze_items"] == len(records["cloze"])
    assert results["lcot_sotu_choice"]["acc,none"] == choice["accuracy"]
    assert results["lcot_sotu_choice"]["acc_norm,none"] == choice["accuracy_norm"]
    assert results["lcot_sotu_cloze"]["acc,none"] == cloze["cloze_accuracy"]
    assert 0 < choice["accuracy"] < 1 and 0 < cloze["cloze_accuracy"] < 1  # neither is a constant


def test_generate_until_stops_at_until_and_cuts_long_prompts(adapter, items):
    from megatron_lcot.inference.generation import generate_ids
    from megatron_lcot.inference.sampling import SamplingParams

    greedy, seq = SamplingParams(greedy=True), adapter.seq_length
    short, long = "The Congress", " ".join(item["context"] for item in items["cloze"][:4])
    full = [
        generate_ids(adapter.trained, [adapter.tokenize(prompt)[-(seq - 12) :]], 12, greedy).texts[0]
        for prompt in (short, long)
    ]
    stop = full[0][len(full[0]) // 2 :][:3]  # a string the uncut generation contains
    assert len(adapter.tokenize(long)) > seq and stop
    texts = adapter.generate_until(
        _requests(
            "generate_until",
            [(short, {"until": [stop], "max_gen_toks": 12}), (long, {"until": "never", "max_gen_toks": 12})],
        )
    )
    assert texts == [full[0][: full[0].index(stop)], full[1]]


def test_bad_load_fails_early_naming_load(tmp_path):
    for model_args, phrase in (
        (["seq_length=64"], "needs load=CKPT_DIR"),
        ([f"load={tmp_path / 'nowhere'}"], "no such directory"),
    ):
        run = _run(
            [LAUNCHER, "--model", "lcot", "--model_args", *model_args, "--tasks", "lambada_openai"],
            cwd=tmp_path,
            timeout=300,
        )
        assert run.returncode == 2, run.stderr[-3000:]
        message = run.stderr.strip().splitlines()[-1]
        assert message.startswith("lm_eval_lcot.py: error: --model_args") and phrase in message, message
        assert "load=" in message
