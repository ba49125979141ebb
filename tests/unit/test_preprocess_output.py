"""Preprocessing output: round trip through megatron-core, determinism, formats, merging."""

from __future__ import annotations

import gzip
import os
import shutil

import numpy as np
import pytest

from megatron_lcot.data.preprocessing.cli import merge_main
from megatron_lcot.data.preprocessing.indexed_writer import IndexedWriter, merge_indexed
from megatron_lcot.data.tokenizers import build_tokenizer
from tests.unit.preprocess_helpers import files_equal, read_documents, run, sotu_texts, write_jsonl


def test_round_trip_through_megatron_core_equals_tokenizer_output(tmp_path, corpus, sp_args):
    path, texts = corpus
    result, _ = run([path], tmp_path / "out", sp_args, append_eod=True, workers=2)
    tok = build_tokenizer(**sp_args)
    expected = [tok.tokenize(t) + [tok.eod] for t in texts]
    assert read_documents(str(tmp_path / "out_text_document")) == expected
    assert result.documents == len(texts) and result.tokens == sum(map(len, expected))
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert IndexedDataset(str(tmp_path / "out_text_document")).index.dtype == np.uint16


def test_workers_and_partitions_do_not_change_the_bytes(tmp_path, corpus, sp_args):
    path, _ = corpus
    run([path], tmp_path / "w1", sp_args, append_eod=True, workers=1, partitions=1)
    run([path], tmp_path / "w4", sp_args, append_eod=True, workers=4)
    run([path], tmp_path / "p3", sp_args, append_eod=True, workers=2, partitions=3)
    result, _ = run([path], tmp_path / "p7", sp_args, append_eod=True, workers=2, partitions=7)
    assert result.partitions == 7  # byte-range cuts inside one JSON lines file
    for other in ("w4", "p3", "p7"):
        assert files_equal(str(tmp_path / "w1_text_document"), str(tmp_path / f"{other}_text_document"))


def test_writer_and_merge_are_byte_identical_to_megatron_core_builder(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    parts = [
        [
            [list(rng.integers(0, 60000, rng.integers(1, 50))) for _ in range(rng.integers(1, 4))]
            for _ in range(20)
        ]
        for _ in range(3)
    ]
    for i, documents in enumerate(parts):
        ours = IndexedWriter(str(tmp_path / f"ours{i}"), np.uint16)
        ours.add_documents(documents[:10])
        for document in documents[10:]:
            ours.add_array_document([[np.asarray(s[:2]), np.asarray(s[2:])] for s in document])
        ours.finalize()
        builder = IndexedDatasetBuilder(str(tmp_path / f"ref{i}.bin"), dtype=np.uint16)
        for document in documents:
            builder.add_document(torch.tensor([t for s in document for t in s]), [len(s) for s in document])
        builder.finalize(str(tmp_path / f"ref{i}.idx"))
        assert files_equal(str(tmp_path / f"ours{i}"), str(tmp_path / f"ref{i}"))
    merge_indexed([str(tmp_path / f"ours{i}") for i in range(3)], str(tmp_path / "ours_merged"))
    builder = IndexedDatasetBuilder(str(tmp_path / "ref_merged.bin"), dtype=np.uint16)
    for i in range(3):
        builder.add_index(str(tmp_path / f"ref{i}"))
    builder.finalize(str(tmp_path / "ref_merged.idx"))
    assert files_equal(str(tmp_path / "ours_merged"), str(tmp_path / "ref_merged"))
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))


def test_every_input_format_gives_the_same_documents(tmp_path, sp_args):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = sotu_texts(6, start=150)
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    raw = open(jsonl, "rb").read()
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "a.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(t)
    (tmp_path / "blocks.txt").write_text("First block,\nline two.\n\n\nSecond block.\n \t\nThird\n")
    pq.write_table(pa.table({"text": texts}), tmp_path / "c.parquet", row_group_size=4)
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "loadable").mkdir()
    shutil.copy(jsonl, tmp_path / "loadable" / "train.jsonl")

    tok = build_tokenizer(**sp_args)
    expected = [tok.tokenize(t) for t in texts]
    cases = {
        "jsonl": [jsonl],
        "gz_dir": [tmp_path / "gz"],
        "zst_glob": [str(tmp_path / "*.zst")],
        "txt_dir": [tmp_path / "txt"],
        "parquet": [tmp_path / "c.parquet"],
        "saved": [tmp_path / "saved"],
        "load_dataset": [f"hf:{tmp_path / 'loadable'}"],
    }
    for name, inputs in cases.items():
        run(inputs, tmp_path / name, sp_args, workers=2)
        assert read_documents(str(tmp_path / f"{name}_text_document")) == expected, name
    run([tmp_path / "blocks.txt"], tmp_path / "blocks", sp_args, text_documents="blank-line")
    blocks = ["First block,\nline two.", "Second block.", "Third"]
    assert read_documents(str(tmp_path / "blocks_text_document")) == [tok.tokenize(b) for b in blocks]
    run([jsonl, tmp_path / "c.parquet"], tmp_path / "two", sp_args)
    assert read_documents(str(tmp_path / "two_text_document")) == expected + expected


@pytest.mark.parametrize("kind", ["sp", "gpt2"])
def test_long_documents_are_tokenized_in_pieces_exactly(tmp_path, trained_tokenizers, kind):
    args = (
        {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": trained_tokenizers["sp"]}
        if kind == "sp"
        else {
            "tokenizer_type": "GPT2BPETokenizer",
            "vocab_file": trained_tokenizers["vocab"],
            "merge_file": trained_tokenizers["merges"],
        }
    )
    text = "\n\n".join(sotu_texts(4, start=60)) + "  trailing   spaces\n\n"
    path = write_jsonl(
        tmp_path / "long.jsonl", [{"text": "short one"}, {"text": text}, {"text": "short two"}]
    )
    run([path], tmp_path / "out", args, append_eod=True, long_document_chars=2000)
    tok = build_tokenizer(**args)
    assert read_documents(str(tmp_path / "out_text_document")) == [
        tok.tokenize(t) + [tok.eod] for t in ("short one", text, "short two")
    ]


def test_split_sentences_writes_one_sequence_per_sentence(tmp_path, sp_args):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    path = write_jsonl(
        tmp_path / "s.jsonl",
        [{"text": "The Union is strong. We rise! Do we? Yes."}, {"text": "One sentence"}],
    )
    run([path], tmp_path / "out", sp_args, split_sentences=True, append_eod=True)
    dataset = IndexedDataset(str(tmp_path / "out_text_sentence"))
    tok = build_tokenizer(**sp_args)
    assert list(dataset.document_indices) == [0, 4, 5]
    assert list(dataset[3]) == tok.tokenize("Yes.") + [tok.eod]
    assert list(dataset[0]) == tok.tokenize("The Union is strong.")


def test_several_json_keys_give_one_dataset_each(tmp_path, sp_args):
    path = write_jsonl(
        tmp_path / "k.jsonl",
        [{"title": "A title", "text": "Some body text."}, {"title": "Second", "text": "More."}],
    )
    run([path], tmp_path / "out", sp_args, json_keys=["text", "title"])
    tok = build_tokenizer(**sp_args)
    assert read_documents(str(tmp_path / "out_title_document")) == [
        tok.tokenize("A title"),
        tok.tokenize("Second"),
    ]
    assert read_documents(str(tmp_path / "out_text_document")) == [
        tok.tokenize("Some body text."),
        tok.tokenize("More."),
    ]


def test_merge_tool_equals_preprocessing_the_concatenation(tmp_path, sp_args, capsys):
    texts = sotu_texts(6, start=10)
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:3]])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in texts[3:]])
    run([a], tmp_path / "shard0", sp_args, append_eod=True)
    run([b], tmp_path / "shard1", sp_args, append_eod=True)
    run([a, b], tmp_path / "whole", sp_args, append_eod=True)
    code = merge_main(
        [
            "--input",
            str(tmp_path / "shard0_text_document.idx"),
            str(tmp_path / "shard1_text_document"),
            "--output-prefix",
            str(tmp_path / "merged"),
        ]
    )
    assert code == 0 and "6 documents" in capsys.readouterr().out
    assert files_equal(str(tmp_path / "merged"), str(tmp_path / "whole_text_document"))
    assert merge_main(["--input", str(tmp_path / "nope"), "--output-prefix", str(tmp_path / "m2")]) == 2
    assert "nope.bin does not exist" in capsys.readouterr().err
