"""Command lines of the data tools, in Megatron-LM's flag names; the tools in ``tools/`` call these.

Flag groups shared by several tools (tokenizer, inputs) are defined once here. User mistakes
(``PreprocessError``, ``TokenizerError``, ``--strict`` failures) print one ``error:`` line and
exit with status 2 (configuration) or 1 (bad record under ``--strict``), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ..tokenizers import TOKENIZER_TYPES, TokenizerError


def add_tokenizer_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tokenizer")
    group.add_argument(
        "--tokenizer-type",
        required=True,
        choices=TOKENIZER_TYPES,
        metavar="{" + ",".join(TOKENIZER_TYPES) + "}",
        help="which tokenizer library and file format",
    )
    group.add_argument(
        "--tokenizer-model", help="sentencepiece .model, or Hugging Face tokenizer.json (or its directory)"
    )
    group.add_argument("--vocab-file", help="GPT-2 BPE vocab.json (GPT2BPETokenizer)")
    group.add_argument("--merge-file", help="GPT-2 BPE merges.txt (GPT2BPETokenizer)")
    group.add_argument(
        "--vocab-size", type=int, help="NullTokenizer: ids are 0..vocab-size-1, eod is vocab-size"
    )


def tokenizer_args(args: argparse.Namespace) -> dict:
    return {
        "tokenizer_type": args.tokenizer_type,
        "tokenizer_model": args.tokenizer_model,
        "vocab_file": args.vocab_file,
        "merge_file": args.merge_file,
        "vocab_size": args.vocab_size,
    }


def add_input_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input")
    group.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="files, directories, globs (quote them), save_to_disk directories or hf:PATH; "
        "JSON lines (.jsonl/.json, also .gz/.zst), text (.txt/.md/.rst), .parquet",
    )
    group.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="record fields (JSON keys / columns) to tokenize; one output dataset per key",
    )
    group.add_argument(
        "--text-documents",
        choices=("file", "blank-line"),
        default="file",
        help="plain-text inputs: one document per file, or per blank-line-separated block",
    )
    group.add_argument(
        "--hf-split", default="train", help="split of a Hugging Face DatasetDict / load_dataset"
    )


def run_cli(
    main: Callable[[argparse.Namespace], int],
    parser: argparse.ArgumentParser,
    argv: list[str] | None = None,
) -> int:
    """Parse ``argv`` and run ``main``, turning user mistakes into one ``error:`` line."""
    from .errors import PreprocessError
    from .run import StrictModeError, strict_failure_message

    args = parser.parse_args(argv)
    try:
        return main(args)
    except (PreprocessError, TokenizerError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except StrictModeError as error:
        print(strict_failure_message(error), file=sys.stderr)
        return 1


def preprocess_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tools/preprocess_data.py",
        description="Tokenize text corpora into megatron indexed datasets (<prefix>_<key>_document.bin/.idx).",
    )
    add_input_args(parser)
    add_tokenizer_args(parser)
    group = parser.add_argument_group("output")
    group.add_argument("--output-prefix", required=True, help="path prefix of the output datasets")
    group.add_argument(
        "--append-eod", action="store_true", help="append the tokenizer's end-of-document id to each document"
    )
    group.add_argument(
        "--split-sentences", action="store_true", help="one sequence per sentence (outputs *_sentence)"
    )
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--workers", type=int, default=1, help="worker processes (each tokenizes whole partitions)"
    )
    group.add_argument(
        "--partitions",
        type=int,
        default=None,
        help="units of work and of --resume (default: 4 per worker, at least one per 256 MiB)",
    )
    group.add_argument(
        "--resume", action="store_true", help="reuse finished partitions of an interrupted run"
    )
    group.add_argument(
        "--keep-partitions", action="store_true", help="keep the per-partition outputs after merging"
    )
    group.add_argument(
        "--strict", action="store_true", help="fail at the first bad record instead of skipping it"
    )
    group.add_argument("--log-interval", type=float, default=10.0, help="seconds between progress lines")
    group.add_argument(
        "--max-document-chars",
        type=int,
        default=0,
        help="skip documents longer than this (counted as too_long); 0 keeps all",
    )
    group.add_argument(
        "--long-document-chars",
        type=int,
        default=1 << 20,
        help="documents longer than this are tokenized in pieces (bounded memory)",
    )
    group.add_argument("--batch-chars", type=int, default=1 << 20, help="characters per tokenizer batch call")
    return parser


def preprocess_main(argv: list[str] | None = None) -> int:
    from .run import PreprocessConfig, preprocess

    def main(args: argparse.Namespace) -> int:
        preprocess(
            PreprocessConfig(
                inputs=args.input,
                output_prefix=args.output_prefix,
                tokenizer_args=tokenizer_args(args),
                json_keys=args.json_keys,
                append_eod=args.append_eod,
                workers=args.workers,
                partitions=args.partitions,
                split_sentences=args.split_sentences,
                text_documents=args.text_documents,
                hf_split=args.hf_split,
                strict=args.strict,
                resume=args.resume,
                keep_partitions=args.keep_partitions,
                log_interval=args.log_interval,
                batch_chars=args.batch_chars,
                long_document_chars=args.long_document_chars,
                max_document_chars=args.max_document_chars,
            )
        )
        return 0

    return run_cli(main, preprocess_parser(), argv)


def merge_main(argv: list[str] | None = None) -> int:
    from .merge import merge_datasets

    parser = argparse.ArgumentParser(
        prog="tools/merge_datasets.py",
        description="Concatenate megatron indexed datasets, in the order given.",
    )
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PREFIX_OR_DIR",
        help="dataset prefixes, or directories whose datasets are taken in sorted order",
    )
    parser.add_argument("--output-prefix", required=True, help="prefix of the merged .bin/.idx")

    def main(args: argparse.Namespace) -> int:
        counts = merge_datasets(args.input, args.output_prefix)
        print(
            f"[merge] {counts['documents']:,} documents, {counts['tokens']:,} tokens -> {args.output_prefix}.bin/.idx"
        )
        return 0

    return run_cli(main, parser, argv)


def train_tokenizer_main(argv: list[str] | None = None) -> int:
    from ..tokenizer_training import TOKENIZER_KINDS, train_tokenizer
    from .sampling import sample_texts

    parser = argparse.ArgumentParser(
        prog="tools/train_tokenizer.py",
        description="Train a tokenizer on a sample of a corpus (same inputs as preprocess_data.py).",
    )
    add_input_args(parser)
    parser.add_argument(
        "--tokenizer-kind",
        choices=TOKENIZER_KINDS,
        default="sentencepiece-bpe",
        help="sentencepiece BPE/unigram (.model) or Hugging Face byte-level BPE (tokenizer.json + vocab.json/merges.txt)",
    )
    parser.add_argument("--vocab-size", type=int, default=32000, help="vocabulary size")
    parser.add_argument(
        "--sample-bytes",
        type=int,
        default=200_000_000,
        help="characters of text to train on, spread over the inputs",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="model prefix for sentencepiece (writes OUTPUT.model), directory for hf-bpe",
    )

    def main(args: argparse.Namespace) -> int:
        from .errors import PreprocessError

        if args.vocab_size < 300:
            raise PreprocessError(
                f"--vocab-size {args.vocab_size}: use at least 300 (byte fallback needs 259 ids)."
            )
        texts = sample_texts(
            args.input, args.json_keys[0], args.sample_bytes, args.text_documents, args.hf_split
        )
        try:
            flags = train_tokenizer(texts, args.tokenizer_kind, args.output, args.vocab_size)
        except RuntimeError as error:  # sentencepiece reports bad settings (e.g. vocab too large) this way
            raise PreprocessError(
                f"tokenizer training failed: {error}; try a smaller --vocab-size or a larger --sample-bytes."
            ) from None
        print("[train_tokenizer] done; preprocess with: " + " ".join(f"{k} {v}" for k, v in flags.items()))
        return 0

    return run_cli(main, parser, argv)
