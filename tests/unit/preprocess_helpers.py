"""Fixtures and helpers of the tokenizer and preprocessing tests (real text, real tokenizers).

Text: State of the Union addresses from the ``sotu`` package, ``[Applause]``-style tags removed.
Tokenizers: a sentencepiece BPE and a Hugging Face byte-level BPE (also written as GPT-2
``vocab.json`` + ``merges.txt``), trained once per session on 40 speeches with our own
``megatron_lcot.data.tokenizer_training`` (what ``tools/train_tokenizer.py`` runs).
"""

from __future__ import annotations

import itertools
import json

import pytest

from megatron_lcot.data.default_corpus import sotu_speeches
from megatron_lcot.data.preprocessing.run import PreprocessConfig, preprocess
from megatron_lcot.data.tokenizer_training import train_bpe, train_sentencepiece


def sotu_texts(count: int, start: int = 0) -> list[str]:
    """Speeches start .. start+count-1 in chronological order (the default corpus' reader)."""
    return list(itertools.islice(sotu_speeches(), start, start + count))


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return str(path)


def read_documents(prefix: str) -> list[list[int]]:
    """Documents of an indexed dataset, read with megatron-core's own ``IndexedDataset``."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [
        [
            int(t)
            for s in range(dataset.document_indices[d], dataset.document_indices[d + 1])
            for t in dataset[s]
        ]
        for d in range(len(dataset.document_indices) - 1)
    ]


def run(inputs, prefix, tokenizer_args, **options):
    """Run the preprocessing pipeline in-process; returns (result, log lines)."""
    lines: list[str] = []
    config = PreprocessConfig(
        inputs=[str(i) for i in inputs], output_prefix=str(prefix), tokenizer_args=tokenizer_args, **options
    )
    return preprocess(config, log=lines.append), lines


def files_equal(prefix_a: str, prefix_b: str) -> bool:
    return all(open(prefix_a + s, "rb").read() == open(prefix_b + s, "rb").read() for s in (".bin", ".idx"))


@pytest.fixture(scope="session")
def trained_tokenizers(tmp_path_factory):
    """Paths of the session's tokenizers: {"sp": .model, "hf": tokenizer.json, "vocab": ..., "merges": ...}."""
    directory = tmp_path_factory.mktemp("tokenizers")
    texts = sotu_texts(40)
    sp_model = train_sentencepiece(texts, str(directory / "sp"), vocab_size=2000)
    bpe = train_bpe(texts, str(directory / "bpe"), vocab_size=2000)
    return {
        "sp": sp_model,
        "hf": bpe["tokenizer_json"],
        "vocab": bpe["vocab_file"],
        "merges": bpe["merge_file"],
    }


@pytest.fixture(scope="session")
def sp_args(trained_tokenizers):
    return {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": trained_tokenizers["sp"]}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A JSON lines corpus of 30 speeches (about 600 KB) and its documents."""
    texts = sotu_texts(30, start=100)
    path = write_jsonl(
        tmp_path_factory.mktemp("corpus") / "sotu.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)]
    )
    return path, texts
