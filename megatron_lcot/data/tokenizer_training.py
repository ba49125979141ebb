"""Train a tokenizer from raw text, so a user with a corpus and nothing else can start.

Two families, both trained by their own library:

* ``train_sentencepiece``: sentencepiece BPE or unigram, with ``</s>`` as a real eos piece
  (used as ``eod``) and byte fallback, so no input byte is ever ``<unk>``.
* ``train_bpe``: Hugging Face byte-level BPE (GPT-2 style), written both as ``tokenizer.json``
  (``--tokenizer-type HuggingFaceTokenizer``) and as ``vocab.json`` + ``merges.txt``
  (``--tokenizer-type GPT2BPETokenizer``), with ``<|endoftext|>`` as eod.

``train_tokenizer`` picks one by name; it is what ``tools/train_tokenizer.py`` calls.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

SENTENCEPIECE_TYPES = ("bpe", "unigram")
TOKENIZER_KINDS = ("sentencepiece-bpe", "sentencepiece-unigram", "hf-bpe")

# sentencepiece drops "sentences" longer than this many bytes, so documents are fed line by line.
_SP_MAX_SENTENCE_BYTES = 1 << 16


def _lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            line = line.strip()
            if line:
                yield line


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    num_threads: int | None = None,
) -> str:
    """Train a sentencepiece model on ``texts`` (documents; split into lines here).

    Ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2 (the eod of ``SentencePieceTokenizer``); no pad piece.
    Returns the path of the written ``<model_prefix>.model`` (a ``.vocab`` is written beside it).
    """
    import sentencepiece

    if model_type not in SENTENCEPIECE_TYPES:
        raise ValueError(f"model_type must be one of {SENTENCEPIECE_TYPES}, got {model_type!r}")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=_lines(texts),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        max_sentence_length=_SP_MAX_SENTENCE_BYTES,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    return model_prefix + ".model"


def train_bpe(texts: Iterable[str], output_dir: str, vocab_size: int) -> dict[str, str]:
    """Train a GPT-2-style byte-level BPE with ``<|endoftext|>`` (id 0) as eod.

    Returns ``{"tokenizer_json": ..., "vocab_file": ..., "merge_file": ...}`` paths in ``output_dir``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    os.makedirs(output_dir, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer_json = os.path.join(output_dir, "tokenizer.json")
    tokenizer.save(tokenizer_json)
    vocab_file, merge_file = tokenizer.model.save(output_dir)
    return {"tokenizer_json": tokenizer_json, "vocab_file": vocab_file, "merge_file": merge_file}


def train_tokenizer(texts: Iterable[str], kind: str, output: str, vocab_size: int) -> dict[str, str]:
    """Train the tokenizer ``kind`` (one of ``TOKENIZER_KINDS``) and return the preprocess flags to use it.

    ``output`` is a model prefix for sentencepiece (``output.model``) and a directory for hf-bpe.
    The returned dict maps flag names (``--tokenizer-type``, ``--tokenizer-model`` or
    ``--vocab-file``/``--merge-file``) to values.
    """
    if kind in ("sentencepiece-bpe", "sentencepiece-unigram"):
        model = train_sentencepiece(texts, output, vocab_size, model_type=kind.split("-")[1])
        return {"--tokenizer-type": "SentencePieceTokenizer", "--tokenizer-model": model}
    if kind == "hf-bpe":
        paths = train_bpe(texts, output, vocab_size)
        return {"--tokenizer-type": "HuggingFaceTokenizer", "--tokenizer-model": paths["tokenizer_json"]}
    raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {TOKENIZER_KINDS}")
