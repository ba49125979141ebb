"""Decode tokens/s of one adaptive checkpoint with halting on vs off, at the same prompts.

    python benchmarks/decode_halting.py --load CKPT_DIR [--prompts FILE] [--max-new-tokens 64]
        [--batch-size 1] [--repeats 3] [--decisive-router]

"off" is the same weights with the halting threshold at 0 (every token runs all K latent
steps); "on" is the checkpoint's threshold. Both decode greedily with the latent KV cache, in
the same process, alternating, best of --repeats. --decisive-router replaces the router by a
random one with a positive bias (seeded), for checkpoints trained too briefly to halt: the
printout says so. Prints one line per setting and the on/off speed ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_PROMPTS = [
    "The Congress of the United States",
    "In the year that has passed",
    "Our foreign relations",
    "The condition of the Treasury",
    "I recommend to the consideration of Congress",
    "War",
    "The people of this country",
    "It is with great satisfaction",
]


def make_router_decisive(model) -> None:
    """Replace our model's halting router in place by a seeded random one (weights ~ N(0, 0.6^2),
    bias 0.5): gates far from 0.9, so tokens of a briefly trained checkpoint halt after 0..K steps."""
    import torch

    router = model.halting_router
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=generator) * 0.6)
        router.bias.fill_(0.5)


def main(argv: list | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", required=True)
    parser.add_argument("--prompts", default=None, help="one prompt per line (default: 8 built-in)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decisive-router", action="store_true")
    args = parser.parse_args(argv)

    from megatron_lcot.inference.generation import generate
    from megatron_lcot.inference.loading import load_trained_model
    from megatron_lcot.inference.sampling import SamplingParams

    prompts = (
        DEFAULT_PROMPTS if args.prompts is None else [l.strip() for l in open(args.prompts) if l.strip()]
    )
    trained = load_trained_model(args.load)
    config = trained.model.config
    if not config.adaptive:
        parser.error(f"--load {args.load}: the checkpoint has no adaptive halting (--halting adaptive).")
    if args.decisive_router:
        make_router_decisive(trained.model)
    thresholds = {"off": 0.0, "on": config.halting_threshold}
    best = {}
    for _ in range(args.repeats):
        for name, threshold in thresholds.items():
            trained.model.config = dataclasses.replace(config, halting_threshold=threshold)
            results = [
                generate(
                    trained,
                    prompts[i : i + args.batch_size],
                    args.max_new_tokens,
                    SamplingParams(greedy=True),
                )
                for i in range(0, len(prompts), args.batch_size)
            ]
            tokens = sum(r.generated_tokens for r in results)
            seconds = sum(r.decode_s for r in results)
            steps = sum(r.mean_latent_steps * r.generated_tokens for r in results) / tokens
            record = {
                "halting": name,
                "threshold": threshold,
                "tokens": tokens,
                "decode_tokens_per_s": tokens / seconds,
                "mean_latent_steps": steps,
            }
            if name not in best or record["decode_tokens_per_s"] > best[name]["decode_tokens_per_s"]:
                best[name] = record
    trained.model.config = config
    for record in best.values():
        print(json.dumps(record))
    summary = {
        "speedup_on_vs_off": best["on"]["decode_tokens_per_s"] / best["off"]["decode_tokens_per_s"],
        "decisive_router": args.decisive_router,
        "batch_size": args.batch_size,
        "max_latent_steps": config.latent_steps,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
