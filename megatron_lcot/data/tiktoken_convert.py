"""Convert tiktoken BPE ranks (e.g. GPT-2's ``gpt2.tiktoken``) to Megatron's vocab.json + merges.txt.

GPT-2's exact tokenizer ships offline inside the ``openai-whisper`` package as
``whisper/assets/gpt2.tiktoken`` (MIT): one ``base64(token_bytes) rank`` per line, ranks 0..50255,
with ``<|endoftext|>`` (50256) implied. Megatron's ``GPT2BPETokenizer`` takes the equivalent
``vocab.json`` (byte-level unicode strings -> ids) and ``merges.txt`` (merge rules in rank
order). The merges are recovered as tiktoken defines them: the two parts a token splits into
when byte-pair merging its bytes with only lower-ranked tokens.

    python -m megatron_lcot.data.tiktoken_convert whisper/assets/gpt2.tiktoken data/gpt2
    # -> data/gpt2/vocab.json, data/gpt2/merges.txt
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import sys

END_OF_TEXT = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def read_tiktoken(path: str) -> dict[bytes, int]:
    """``{token_bytes: rank}`` from a ``.tiktoken`` file (plain or ``.gz``)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        return {
            base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())
        }


def _split_in_two(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    parts = [bytes([b]) for b in token]
    limit = ranks[token]
    while len(parts) > 2:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], limit))
        if ranks.get(parts[best] + parts[best + 1], limit) >= limit:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} is not a merge of two lower-ranked tokens")
    return parts[0], parts[1]


def tiktoken_to_gpt2_files(tiktoken_path: str, output_dir: str) -> tuple[str, str]:
    """Write ``vocab.json`` and ``merges.txt`` for the ranks in ``tiktoken_path``; returns their paths."""
    ranks = read_tiktoken(tiktoken_path)
    byte_encoder = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(byte_encoder[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[END_OF_TEXT] = max(ranks.values()) + 1
    merges = sorted((rank, _split_in_two(ranks, token)) for token, rank in ranks.items() if len(token) > 1)
    os.makedirs(output_dir, exist_ok=True)
    vocab_path, merges_path = os.path.join(output_dir, "vocab.json"), os.path.join(output_dir, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{text(a)} {text(b)}\n" for _, (a, b) in merges)
    return vocab_path, merges_path


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m megatron_lcot.data.tiktoken_convert RANKS.tiktoken OUTPUT_DIR")
    print("wrote", *tiktoken_to_gpt2_files(sys.argv[1], sys.argv[2]))
