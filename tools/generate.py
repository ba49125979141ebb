"""Generate text from a checkpoint with the latent KV cache and per-token halting.

    python tools/generate.py --load CKPT_DIR --prompt "The Congress" [--prompt ...] \
        [--max-new-tokens 64] [--greedy | --temperature 0.8 --top-k 50 --top-p 0.95 --seed 1]
    python tools/generate.py --load CKPT_DIR --input-file prompts.txt    (one prompt per line)

Prompts are batched with left padding (--batch-size). Prints each completion, then one JSON line
with the generated token ids, `mean_latent_steps` per generated token and decode tokens/s.
User mistakes print `generate.py: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="generate.py", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--load", required=True, help="checkpoint directory (pretrain_lcot.py --save)")
    parser.add_argument("--iteration", type=int, default=None, help="default: the latest")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    prompts.add_argument("--input-file", help="a text file with one prompt per line")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (left padding)")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (ignores the sampling flags)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut")
    parser.add_argument("--top-p", type=float, default=1.0, help="1.0 = no nucleus cut")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-model", default=None,
                        help="the tokenizer file, when the path stored in the checkpoint no longer exists")
    return parser


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


def main(argv: list | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from megatron_lcot.inference.generation import generate
    from megatron_lcot.inference.loading import USER_ERRORS, load_trained_model
    from megatron_lcot.inference.sampling import SamplingParams

    try:
        if args.max_new_tokens <= 0 or args.batch_size <= 0:
            raise ValueError("--max-new-tokens and --batch-size must be positive.")
        sampling = SamplingParams(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, seed=args.seed)
        prompts = read_prompts(args)
        trained = load_trained_model(args.load, args.iteration, args.tokenizer_model)
        results = [generate(trained, prompts[i : i + args.batch_size], args.max_new_tokens, sampling)
                   for i in range(0, len(prompts), args.batch_size)]
    except (ValueError, *USER_ERRORS) as error:
        print(f"generate.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    tokens = [row for result in results for row in result.tokens]
    texts = [text for result in results for text in result.texts]
    for prompt, text in zip(prompts, texts):
        print(f"{prompt}{text}\n---")
    generated = sum(r.generated_tokens for r in results)
    summary = {
        "tokens": tokens,
        "generated_tokens": generated,
        "mean_latent_steps": sum(r.mean_latent_steps * r.generated_tokens for r in results) / max(1, generated),
        "decode_tokens_per_s": generated / max(1e-9, sum(r.decode_s for r in results)),
        "prefill_s": sum(r.prefill_s for r in results),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
