"""The one tokenizer abstraction shared by preprocessing and training.

Every tokenizer wraps the library that defines it (sentencepiece, Hugging Face ``tokenizers``)
instead of re-implementing it, and exposes the small surface both sides need:

    tok.tokenize(text) -> list[int]
    tok.tokenize_batch(texts) -> list[list[int]]     # one library call per batch
    tok.detokenize(ids) -> str
    tok.vocab_size -> int                            # size of the id space (the model pads it)
    tok.eod -> int                                   # end-of-document id (``--append-eod``)

An instance can be passed straight to megatron-core 0.16.1's ``GPTDatasetConfig(tokenizer=...)``:
``GPTDataset`` / ``MockGPTDataset`` read ``vocab_size``, ``eod``, ``unique_identifiers`` (hashed into
cache names) and optionally ``pad`` / ``eos``, by attribute, never by ``isinstance``. The classes
implement ``MegatronTokenizerBase``'s methods but do not import it: importing anything under
``megatron.core`` loads torch and the whole package (seconds: docs/benchmarks.md), a tax on every
preprocessing worker and CLI start for a class that adds nothing but an ABC. (The legacy
``MegatronLegacyTokenizer`` would also log a deprecation warning per instance.)

Instances are picklable through their constructor arguments, so worker processes rebuild
the library object instead of receiving a pickled C++ handle.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer", "NullTokenizer")

# Names an end-of-document token goes by in common Hugging Face tokenizers, most specific first.
_HF_EOD_CANDIDATES = (
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<|eot_id|>",
    "[SEP]",
    "<|im_end|>",
)
_GPT2_EOD = "<|endoftext|>"


class TokenizerError(ValueError):
    """A user-facing tokenizer configuration problem; the message names the flag and the fix."""


def _require_file(path: str | None, flag: str, what: str) -> str:
    if not path:
        raise TokenizerError(f"{flag} is required: pass the path to {what}.")
    if not os.path.isfile(path):
        raise TokenizerError(f"{flag} {path!r}: no such file; pass the path to {what}.")
    return path


class LcotTokenizer:
    """Common base: identifiers for dataset caching, pickling by constructor arguments.

    Subclasses set ``self._init_args`` (the kwargs that rebuild them) and implement
    ``tokenize``, ``tokenize_batch``, ``detokenize``, ``vocab_size``, ``eod`` and ``vocab``.
    """

    def __init__(self, **init_args) -> None:
        paths = [v for k, v in init_args.items() if k in ("model_path", "vocab_file", "merge_file") and v]
        self.path = paths[0] if paths else ""
        self._init_args = init_args
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_path", [os.path.abspath(p) for p in paths])]
        )
        self.unique_identifiers.update(
            (k, str(v))
            for k, v in init_args.items()
            if k not in ("model_path", "vocab_file", "merge_file", "num_threads")
        )
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)

    def __reduce__(self):
        return (_rebuild, (type(self), self._init_args))

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenize(t) for t in texts]

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no chat template")

    @property
    def eos(self) -> int:
        return self.eod


def _rebuild(cls, init_args):
    return cls(**init_args)


class SentencePieceTokenizer(LcotTokenizer):
    """A sentencepiece ``.model``; ``eod`` is its ``</s>`` (eos) id.

    ``num_threads`` bounds sentencepiece's batch encoder (None: library default, all cores);
    preprocessing workers pass 1 so N processes use N cores, not N*N threads.
    """

    def __init__(self, model_path: str, num_threads: int | None = None) -> None:
        import sentencepiece

        _require_file(model_path, "--tokenizer-model", "a sentencepiece .model file")
        super().__init__(model_path=model_path, num_threads=num_threads)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as error:
            raise TokenizerError(
                f"--tokenizer-model {model_path!r} is not a sentencepiece model ({error}); "
                "pass a .model file, or use --tokenizer-type HuggingFaceTokenizer for tokenizer.json."
            ) from None
        self._num_threads = -1 if num_threads is None else num_threads

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=self._num_threads)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def vocab(self) -> dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    @property
    def eod(self) -> int:
        eos = self._sp.eos_id()
        if eos < 0:
            raise TokenizerError(
                f"--tokenizer-model {self._init_args['model_path']!r} has no </s> (eos) piece, "
                "which is used as end-of-document; retrain it with tools/train_tokenizer.py."
            )
        return eos

    @property
    def bos(self) -> int:
        return self._sp.bos_id()


class _HFBackedTokenizer(LcotTokenizer):
    """Shared encode/decode over a Hugging Face ``tokenizers.Tokenizer`` held in ``self._tk``.

    Special tokens (BOS etc. added by a post-processor) are not added: documents are separated
    by ``eod`` alone, as in Megatron-LM's GPT data.
    """

    _tk = None
    _eod_id: int | None = None

    def tokenize(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def backend(self):
        """The `tokenizers.Tokenizer` that encodes (hf/tokenizer_files.py writes its files)."""
        return self._tk

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        return self._tk.get_vocab(with_added_tokens=True)

    @property
    def eod(self) -> int:
        if self._eod_id is None:
            raise TokenizerError(
                f"the tokenizer has none of the end-of-document tokens {list(_HF_EOD_CANDIDATES)}; "
                "add one as a special token (or set eos_token in tokenizer_config.json next to it)."
            )
        return self._eod_id


class HuggingFaceTokenizer(_HFBackedTokenizer):
    """A Hugging Face ``tokenizer.json`` (or a directory holding one), loaded with ``tokenizers``.

    ``eod``: ``eos_token`` from a ``tokenizer_config.json`` beside it if present, else the first
    of the usual end-of-text tokens that the vocabulary has.
    """

    def __init__(self, model_path: str, num_threads: int | None = None) -> None:
        from tokenizers import Tokenizer

        if model_path and os.path.isdir(model_path):
            model_path = os.path.join(model_path, "tokenizer.json")
        _require_file(model_path, "--tokenizer-model", "a Hugging Face tokenizer.json (or its directory)")
        super().__init__(model_path=model_path, num_threads=num_threads)
        if num_threads is not None:
            os.environ.setdefault("RAYON_NUM_THREADS", str(num_threads))
        try:
            self._tk = Tokenizer.from_file(model_path)
        except Exception as error:  # tokenizers raises a bare Exception on parse errors
            raise TokenizerError(
                f"--tokenizer-model {model_path!r} is not a Hugging Face tokenizer.json ({error}); "
                "use --tokenizer-type SentencePieceTokenizer for a .model file."
            ) from None
        self._eod_id = self._find_eod(model_path)

    def _find_eod(self, model_path: str) -> int | None:
        config_path = os.path.join(os.path.dirname(model_path), "tokenizer_config.json")
        candidates = list(_HF_EOD_CANDIDATES)
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if eos:
                candidates.insert(0, eos)
        for token in candidates:
            token_id = self._tk.token_to_id(token)
            if token_id is not None:
                return token_id
        return None


class GPT2BPETokenizer(_HFBackedTokenizer):
    """GPT-2 byte-level BPE from Megatron's ``vocab.json`` + ``merges.txt`` pair.

    Built as GPT-2 defines it (byte-level pre-tokenizer with GPT-2's regex, no prefix space,
    byte-level decoder) on the ``tokenizers`` BPE model. ``<|endoftext|>`` is the eod id; it is
    not registered as a special token, so a literal "<|endoftext|>" in a document is encoded as
    text (as Megatron-LM's GPT-2 tokenizer does) instead of injecting a document boundary.
    """

    def __init__(self, vocab_file: str, merge_file: str, num_threads: int | None = None) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        _require_file(vocab_file, "--vocab-file", "GPT-2's vocab.json (see docs/preprocessing.md)")
        _require_file(merge_file, "--merge-file", "GPT-2's merges.txt (see docs/preprocessing.md)")
        super().__init__(vocab_file=vocab_file, merge_file=merge_file, num_threads=num_threads)
        if num_threads is not None:
            os.environ.setdefault("RAYON_NUM_THREADS", str(num_threads))
        try:
            bpe = models.BPE.from_file(vocab_file, merge_file)
        except Exception as error:
            raise TokenizerError(
                f"--vocab-file {vocab_file!r} / --merge-file {merge_file!r} are not a GPT-2 BPE "
                f"vocab.json + merges.txt pair ({error})."
            ) from None
        self._tk = Tokenizer(bpe)
        self._tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tk.decoder = decoders.ByteLevel()
        self._eod_id = self._tk.token_to_id(_GPT2_EOD)


class NullTokenizer(LcotTokenizer):
    """Text that is already token ids separated by spaces (Megatron-LM's NullTokenizer).

    Ids are ``0 .. vocab_size-1``; ``eod`` is the extra id ``vocab_size``, so the id space
    (``self.vocab_size``) is ``--vocab-size + 1``.
    """

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or int(vocab_size) <= 0:
            raise TokenizerError(
                "--vocab-size is required with --tokenizer-type NullTokenizer (a positive integer)."
            )
        super().__init__(vocab_size=int(vocab_size))
        self._base_size = int(vocab_size)

    def tokenize(self, text: str) -> list[int]:
        ids = [int(x) for x in text.split()]
        if any(i < 0 or i >= self._base_size for i in ids):
            raise ValueError(f"token id out of range [0, {self._base_size}) for NullTokenizer")
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    @property
    def vocab_size(self) -> int:
        return self._base_size + 1

    @property
    def vocab(self) -> dict[str, int]:
        return {str(i): i for i in range(self.vocab_size)}

    @property
    def eod(self) -> int:
        return self._base_size


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    vocab_size: int | None = None,
    num_threads: int | None = None,
) -> LcotTokenizer:
    """Build the tokenizer named by ``--tokenizer-type`` from the flags' values.

    Raises ``TokenizerError`` (a ``ValueError``) naming the flag and the fix for an unknown type,
    a missing or unreadable file, or a missing ``--vocab-size``.
    """
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model, num_threads=num_threads)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model, num_threads=num_threads)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file, num_threads=num_threads)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise TokenizerError(
        f"--tokenizer-type {tokenizer_type!r} is not supported; choose one of {', '.join(TOKENIZER_TYPES)}."
    )
