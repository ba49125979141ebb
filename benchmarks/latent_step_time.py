"""Training-step cost of each latent mode relative to vanilla, measured in the same run.

Forward + backward of one micro-batch (fp32, random weights, random token ids: only shapes
matter for time) for vanilla, stepwise fixed-K, adaptive and interleaved (Jacobi) models of the
same shape. Modes are timed round-robin, `--repeats` times each, and the median counts, so a
load change on the machine hits every mode alike. Prints seconds per step, tokens/s and the
ratio to vanilla next to METHOD.md's ideal (linear layers x passes, ignoring attention growth).

    .venv/bin/python benchmarks/latent_step_time.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")

from megatron_lcot import parallel  # noqa: E402
from megatron_lcot.model import build_lcot_model, llama_config  # noqa: E402

# name -> (config fields, ideal cost in vanilla passes)
MODES = {
    "vanilla": ({}, 1.0),
    "stepwise K=1": ({"latent_steps": 1}, 2.0),
    "stepwise K=2": ({"latent_steps": 2}, 3.0),
    "adaptive K=2": ({"latent_steps": 2, "halting": "adaptive"}, 3.0),
    # warm-up (T slots) + J=2 Jacobi + final pass over 2T slots: 1 + 3 x 2 = 7 vanilla passes
    "interleaved K=1 J=2": ({"latent_steps": 1, "latent_layout": "interleaved", "jacobi_iters": (2,)}, 7.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    parallel.initialize(seed=0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=parallel.device())
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), device=parallel.device())
    positions = torch.arange(args.seq, device=parallel.device()).expand(args.batch, -1)
    models = {
        name: build_lcot_model(
            llama_config(args.layers, args.hidden, 4, ffn_hidden_size=688, num_query_groups=2, **fields),
            args.vocab, args.seq,
        ).to(parallel.device())
        for name, (fields, _) in MODES.items()
    }

    def step(model) -> float:
        start = time.perf_counter()
        model(ids, positions, labels=labels).loss.mean().backward()
        if parallel.device().type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for model in models.values():  # warm-up
        step(model)
    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(step(model))

    tokens = args.batch * args.seq
    base = statistics.median(times["vanilla"])
    print(f"device {parallel.device()} threads {args.threads} | {args.layers} layers h {args.hidden} "
          f"vocab {args.vocab} | batch {args.batch} x seq {args.seq} | median of {args.repeats}")
    print(f"{'mode':<22} {'s/step':>8} {'tokens/s':>9} {'x vanilla':>10} {'ideal':>6}")
    for name, (_, ideal) in MODES.items():
        median = statistics.median(times[name])
        print(f"{name:<22} {median:>8.3f} {tokens / median:>9.0f} {median / base:>10.2f} {ideal:>6.1f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
