"""Find the datasets to merge for ``tools/merge_datasets.py`` and merge them.

Inputs are prefixes (``path/name`` for ``path/name.bin`` + ``.idx``; a trailing ``.bin``/``.idx``
is accepted) or directories, which contribute every prefix inside them in sorted order.
"""

from __future__ import annotations

import os

from .errors import PreprocessError
from .indexed_writer import IndexReadError, merge_indexed


def find_prefixes(inputs: list[str]) -> list[str]:
    prefixes = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, n[:-4]) for n in os.listdir(item) if n.endswith(".idx"))
            if not found:
                raise PreprocessError(f"--input {item!r}: the directory holds no .idx files.")
            prefixes.extend(found)
            continue
        prefix = item[:-4] if item.endswith((".bin", ".idx")) else item
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                raise PreprocessError(
                    f"--input {item!r}: {prefix + suffix} does not exist; pass a dataset prefix."
                )
        prefixes.append(prefix)
    return prefixes


def merge_datasets(inputs: list[str], output_prefix: str) -> dict:
    """Merge the datasets named by ``inputs`` into ``output_prefix``; returns its counts."""
    prefixes = find_prefixes(inputs)
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in prefixes}:
        raise PreprocessError(f"--output-prefix {output_prefix!r} is also an input; choose another prefix.")
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    try:
        return merge_indexed(prefixes, output_prefix)
    except IndexReadError as error:
        raise PreprocessError(f"--input: {error}") from None
