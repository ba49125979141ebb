"""Evaluate a checkpoint (or its Hugging Face export): perplexity, or zero-shot task accuracy.

    python tools/evaluate.py --load CKPT_DIR --input FILE [--json-key text] [--seq-length N --stride S]
    python tools/evaluate.py --hf HF_DIR   --input FILE ...          (the exported copy, transformers only)
    python tools/evaluate.py --load CKPT_DIR --task TASK.jsonl        (multiple choice / cloze)

--input: plain text (one document) or JSON lines (.jsonl/.json, or any file with --json-key):
one document per record, read from --json-key (default "text"). Documents are tokenized as
training data (no BOS, eod after each) and scored with sliding windows of --seq-length tokens
moved by --stride (default: --seq-length, no overlap); which tokens are scored is in
docs/hf.md ("Evaluate"). Perplexity is over the tokenizer's real vocabulary.

--task: JSON lines, each {"context": str, "choices": [str, ...], "answer": int} (multiple
choice) or {"context": str, "target": str} (cloze, e.g. a last word).

Progress goes to stderr; the last line of stdout is one JSON object (`perplexity`, `tokens`,
`mean_latent_steps`, `halted_share`, ... or the task scores). User mistakes print
`evaluate.py: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate.py", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--load", help="checkpoint directory (pretrain_lcot.py --save)")
    model.add_argument("--hf", help="Hugging Face directory written by convert_checkpoint.py to-hf")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--input", help="text or JSON-lines file to compute perplexity on")
    data.add_argument("--task", help="JSON-lines task file (multiple choice or cloze)")
    parser.add_argument(
        "--json-key", default=None, help="field holding the text in JSON lines (default: text)"
    )
    parser.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help="window length (default: the checkpoint's --seq-length; required with --hf)",
    )
    parser.add_argument("--stride", type=int, default=None, help="window step (default: --seq-length)")
    parser.add_argument("--iteration", type=int, default=None)
    parser.add_argument(
        "--tokenizer-model",
        default=None,
        help="the tokenizer file, when the path stored in the checkpoint no longer exists",
    )
    return parser


def read_task(path: str) -> list:
    if not os.path.isfile(path):
        raise ValueError(f"--task {path!r}: no such file.")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            valid = (
                isinstance(record, dict)
                and isinstance(record.get("context"), str)
                and (
                    (
                        isinstance(record.get("choices"), list)
                        and len(record["choices"]) > 1
                        and isinstance(record.get("answer"), int)
                        and 0 <= record["answer"] < len(record["choices"])
                    )
                    or isinstance(record.get("target"), str)
                    and record["target"] != ""
                )
            )
            if not valid:
                raise ValueError(
                    f'--task {path!r} line {number}: expected {{"context", "choices", "answer"}} '
                    '(answer an index into choices) or {"context", "target"}; see docs/hf.md.'
                )
            records.append(record)
    if not records:
        raise ValueError(f"--task {path!r} holds no records.")
    return records


def _progress(done: int, total: int, seconds: float) -> None:
    rate = done / max(seconds, 1e-9)
    print(
        f"[evaluate] {done}/{total} tokens  {rate:.0f} tok/s  eta {max(0.0, (total - done) / max(rate, 1e-9)):.0f}s",
        file=sys.stderr,
    )


def main(argv: list | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from megatron_lcot.data.documents import read_documents, token_stream
    from megatron_lcot.inference.loading import USER_ERRORS, load_trained_model
    from megatron_lcot.inference.scoring import (
        CheckpointScorer,
        HFScorer,
        score_task,
        sliding_window_perplexity,
    )

    try:
        documents = read_documents(args.input, args.json_key) if args.input else None
        records = read_task(args.task) if args.task else None
        if args.load:
            trained = load_trained_model(args.load, args.iteration, args.tokenizer_model)
            scorer, tokenize, eod = (
                CheckpointScorer(trained),
                trained.tokenizer.tokenize,
                trained.tokenizer.eod,
            )
            seq_length = args.seq_length or trained.config.model.seq_length
        else:
            if args.seq_length is None:
                raise ValueError("--hf needs --seq-length (use the checkpoint's to compare with --load).")
            if not os.path.isfile(os.path.join(args.hf, "config.json")):
                raise ValueError(
                    f"--hf {args.hf!r}: no config.json there; pass a directory written by "
                    "convert_checkpoint.py to-hf."
                )
            scorer = HFScorer(args.hf)
            tokenize, eod, seq_length = scorer.tokenize, scorer.eod, args.seq_length
        stride = args.stride or seq_length
        if not 0 < stride <= seq_length:
            raise ValueError(f"--stride {stride} must be in [1, --seq-length {seq_length}].")
        if records is not None:
            result = score_task(records, scorer, tokenize, seq_length, eod)
        else:
            stream = token_stream(documents, tokenize, eod)
            result = sliding_window_perplexity(stream, scorer, seq_length, stride, _progress)
            if args.load:
                result.update(_flops(trained, seq_length, result["halted_share"]))
    except (ValueError, *USER_ERRORS) as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    result.update(seq_length=seq_length, stride=stride)
    print(json.dumps(result))
    return result


def _flops(trained, seq_length: int, halted_share: list) -> dict:
    """Inference FLOPs per token at the measured halting (share of tokens running step k)."""
    from megatron_lcot.model.flops import inference_flops_per_token, step_shares_from_halted

    return {
        "flops_per_token": inference_flops_per_token(
            trained.model.config,
            seq_length,
            trained.config.model.padded_vocab_size,
            step_shares_from_halted(halted_share),
        )
    }


if __name__ == "__main__":
    main()
