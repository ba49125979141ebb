"""Generate text from a checkpoint with the latent KV cache and per-token halting.

    python tools/generate.py --load CKPT_DIR --prompt "The Congress" [--prompt ...] \
        [--max-new-tokens 64] [--temperature 0.8 --top-k 50 --top-p 0.95 --repetition-penalty 1.2] \
        [--stop "\n\n" --stop "."] [--seed 1]
    python tools/generate.py --load CKPT_DIR --input-file prompts.txt    (one prompt per line)

The sampling flags mean what transformers' `generate()` arguments of the same names mean;
`--temperature 0` (or `--greedy`) is argmax decoding. A completion ends at the tokenizer's eod,
before the first `--stop` string, or after `--max-new-tokens`.

With `--batch-size 1` (the default) each prompt's completion is printed piece by piece as the
tokens are generated (flushed); with a larger batch, prompts are decoded together (left padding)
and each completion is printed when its batch ends. Completions are followed by `---`; a line
on stderr gives the latent steps each generated token ran, and the last stdout line is one JSON
object: the generated token ids, the texts, `latent_steps` per generated token per prompt,
`mean_latent_steps` and decode tokens/s. Bad flags print `generate.py: error: ...` and exit 2
before the checkpoint is read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="generate.py", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    parser.add_argument("--load", required=True, help="checkpoint directory (pretrain_lcot.py --save)")
    parser.add_argument("--iteration", type=int, default=None, help="default: the latest")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    prompts.add_argument("--input-file", help="a text file with one prompt per line")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="prompts decoded together (left padding); 1 streams each completion as it comes",
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (argmax)")
    parser.add_argument("--greedy", action="store_true", help="the same as --temperature 0")
    parser.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut")
    parser.add_argument("--top-p", type=float, default=1.0, help="1.0 = no nucleus cut")
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="1.0 = off; > 1 lowers the logits of ids already in the sequence (prompt included)",
    )
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        help="a stop string (repeat for several): the completion ends before it",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tokenizer-model",
        default=None,
        help="the tokenizer file, when the path stored in the checkpoint no longer exists",
    )
    return parser


def check_flags(args) -> None:
    """Refuse bad flag values before anything is loaded (ValueError naming the flag)."""
    for flag in ("max_new_tokens", "batch_size"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be positive.")
    if any(stop == "" for stop in args.stop):
        raise ValueError("--stop '' is empty; pass a non-empty string (e.g. --stop '\\n').")


def read_prompts(args) -> list:
    if args.prompt is not None:
        return args.prompt
    if not os.path.isfile(args.input_file):
        raise ValueError(f"--input-file {args.input_file!r}: no such file.")
    with open(args.input_file, encoding="utf-8") as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"--input-file {args.input_file!r} has no non-empty line.")
    return prompts


def latent_steps_line(latent_steps: list, max_steps: int) -> str:
    """'latent steps per generated token: mean 1.62 | 0:0.10 1:0.25 ...' (share of tokens by steps run)."""
    steps = [s for row in latent_steps for s in row]
    shares = " ".join(
        f"{k}:{sum(s == k for s in steps) / max(1, len(steps)):.2f}" for k in range(max_steps + 1)
    )
    return f"latent steps per generated token: mean {sum(steps) / max(1, len(steps)):.2f} | {shares}"


def main(argv: list | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from megatron_lcot.inference.generation import generate
    from megatron_lcot.inference.loading import USER_ERRORS, load_trained_model
    from megatron_lcot.inference.sampling import SamplingParams

    def stream(row: int, piece: str) -> None:
        print(piece, end="", flush=True)

    try:
        check_flags(args)
        sampling = SamplingParams(
            temperature=0.0 if args.greedy else args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
        )
        prompts = read_prompts(args)
        trained = load_trained_model(args.load, args.iteration, args.tokenizer_model)
        results = []
        for first in range(0, len(prompts), args.batch_size):
            batch = prompts[first : first + args.batch_size]
            if args.batch_size == 1:
                print(batch[0], end="", flush=True)
            result = generate(
                trained,
                batch,
                args.max_new_tokens,
                sampling,
                stop=tuple(args.stop),
                on_text=stream if args.batch_size == 1 else None,
            )
            for prompt, text in zip(batch, result.texts):
                print("\n---" if args.batch_size == 1 else f"{prompt}{text}\n---", flush=True)
            results.append(result)
    except (ValueError, *USER_ERRORS) as error:
        print(f"generate.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    latent_steps = [row for result in results for row in result.latent_steps]
    print(latent_steps_line(latent_steps, trained.config.model.latent_steps), file=sys.stderr)
    generated = sum(r.generated_tokens for r in results)
    summary = {
        "tokens": [row for result in results for row in result.tokens],
        "texts": [text for result in results for text in result.texts],
        "latent_steps": latent_steps,
        "generated_tokens": generated,
        "mean_latent_steps": sum(map(sum, latent_steps)) / max(1, generated),
        "decode_tokens_per_s": generated / max(1e-9, sum(r.decode_s for r in results)),
        "prefill_s": sum(r.prefill_s for r in results),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
