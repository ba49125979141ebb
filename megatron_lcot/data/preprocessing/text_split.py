"""Split text for tokenization: huge documents into pieces, documents into sentences.

Long documents. Tokenizer libraries hold per-token structures for the whole input (peak
memory a large multiple of the text size, and Hugging Face byte-level BPE slows down
super-linearly: docs/benchmarks.md, "Costs behind design choices"). Documents longer than
``--long-document-chars`` are therefore encoded in pieces of about that many characters, cut
just before a whitespace run that follows a non-whitespace character. Such a cut is a
pre-tokenization boundary of GPT-2's byte-level BPE regex and of sentencepiece models that normalize whitespace (the default, and
what ``tools/train_tokenizer.py`` trains), so the ids equal those of encoding the document whole
(tests check both). Tokenizers that keep raw whitespace (e.g. Llama-style sentencepiece with
``add_dummy_prefix``) may differ in one token at each cut, i.e. once per piece.

Sentences (``--split-sentences``): a dependency-free rule -- a cut after ``.``, ``!`` or ``?``
(optionally followed by closing quotes or brackets) and whitespace, before an uppercase letter,
digit or opening quote. Megatron-LM uses NLTK's punkt, which needs a model download.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")
_CUT_SEARCH_CHARS = 1 << 16


def split_long_text(text: str, max_chars: int) -> Iterator[str]:
    """Yield consecutive pieces of ``text`` (``"".join(pieces) == text``), each at most about ``max_chars``.

    A piece ends before a whitespace character preceded by a non-whitespace one, searched
    backwards from ``max_chars`` over at most 64 Ki characters; without one the cut is hard.
    """
    start = 0
    while len(text) - start > max_chars:
        limit = start + max_chars
        floor = max(start + 1, limit - _CUT_SEARCH_CHARS)
        cut = limit
        while cut > floor and not (text[cut].isspace() and not text[cut - 1].isspace()):
            cut -= 1
        if cut <= floor:
            cut = limit
        yield text[start:cut]
        start = cut
    yield text[start:]


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``; whitespace between them is dropped, each keeps its punctuation."""
    sentences = [s for s in _SENTENCE_END.split(text) if s.strip()]
    return sentences or [text]
