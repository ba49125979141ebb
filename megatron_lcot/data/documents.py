"""Documents for evaluation and analysis tools: read from a text or JSON-lines file, and
tokenized into one stream.

    read_documents(path, json_key)        a plain text file is one document; JSON lines (by
                                          extension, or when a key is given) one per line
    token_stream(documents, tokenize, eod) every document's ids followed by the eod id
"""

from __future__ import annotations

import json
import os


def read_documents(path: str, json_key: str | None, flag: str = "--input") -> list:
    """The documents of `path` (ValueError naming `flag` and the fix on a bad file)."""
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path!r}: no such file.")
    is_json = json_key is not None or path.endswith((".jsonl", ".json"))
    with open(path, encoding="utf-8") as f:
        if not is_json:
            return [f.read()]
        key, documents = json_key or "text", []
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                documents.append(json.loads(line)[key])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(
                    f"{flag} {path!r} line {number}: not a JSON object with a {key!r} field; "
                    "pass --json-key with the field that holds the text."
                ) from None
    return documents


def token_stream(documents: list, tokenize, eod: int) -> list:
    """One list of token ids: each document's, followed by `eod` (a document boundary)."""
    return [token for document in documents for token in [*tokenize(document), eod]]
