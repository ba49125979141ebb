"""Pipeline parallelism for latent modes: PP=2 step time against one process and against the
schedule's predicted bubble, measured in the same run.

For each mode, `pretrain_lcot.py` trains `--iters` steps on mock data (fp32, 1 thread per
process) once in one process and once under `torchrun --nproc-per-node 2` with
`--pipeline-model-parallel-size 2`; the median seconds per iteration after the first two counts.
The prediction for P stages, V passes (virtual chunks: K+1 stepwise; K + max J + 1
interleaved; 1 vanilla) and M micro-batches is

    t_pred = t_1 / P * (V M + P - 1) / (V M)        (bubble fraction (P-1)/(V M + P-1))

i.e. a perfect split of the one-process time plus the schedule's bubble; the measured/predicted
ratio above 1 is what the bubble formula does not see (p2p copies, the passes' unequal
attention cost, other load: on a shared 2-core machine, run it more than once).

    .venv/bin/python benchmarks/pipeline_latent.py --iters 8
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.pretrain_step_time import median_step_seconds  # noqa: E402

PIPELINE_SIZE = 2
TORCHRUN = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc-per-node",
    str(PIPELINE_SIZE),
]

# name -> (flags, passes V as the schedule sees them)
MODES = {
    "vanilla": ([], 1),
    "stepwise K=2": (["--latent-steps", "2"], 3),
    "adaptive K=2": (["--latent-steps", "2", "--halting", "adaptive"], 3),
    "interleaved K=1 J=2": (
        ["--latent-steps", "1", "--latent-layout", "interleaved", "--jacobi-iters", "2"],
        4,
    ),
}


def predicted_seconds(
    one_process: float, passes: int, micro_batches: int, stages: int = PIPELINE_SIZE
) -> float:
    """Perfect split over `stages` plus the interleaved schedule's bubble."""
    chunks = passes * micro_batches
    return one_process / stages * (chunks + stages - 1) / chunks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=4, help="M per step")
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args()
    if args.iters < 3:
        parser.error("--iters must be at least 3 (the first two are not timed)")

    model = [
        "--num-layers",
        str(args.layers),
        "--hidden-size",
        str(args.hidden),
        "--num-attention-heads",
        "4",
        "--num-query-groups",
        "2",
        "--seq-length",
        str(args.seq),
        "--mock-data",
        "--vocab-size",
        "8192",
        "--micro-batch-size",
        str(args.micro_batch),
        "--global-batch-size",
        str(args.micro_batch * args.micro_batches),
        "--train-iters",
        str(args.iters),
        "--eval-interval",
        "100000",
        "--eval-iters",
        "1",
        "--use-cpu-initialization",
    ]
    print(
        f"PP={PIPELINE_SIZE}, M={args.micro_batches} micro-batches of {args.micro_batch} x {args.seq} tokens, "
        f"{args.layers} layers, hidden {args.hidden}; 1 thread per process; median of {args.iters - 2} steps"
    )
    print(
        f"{'mode':<22}{'V':>3}{'1 proc s':>10}{'PP=2 s':>9}{'speed-up':>10}{'bubble':>8}"
        f"{'pred s':>9}{'meas/pred':>11}"
    )
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.modes:
            flags, passes = MODES[name]
            key = name.split()[0]
            one = median_step_seconds([sys.executable], [*model, *flags], workdir, f"{key}-1", skip=2)
            piped = median_step_seconds(
                TORCHRUN,
                [*model, *flags, "--pipeline-model-parallel-size", str(PIPELINE_SIZE)],
                workdir,
                f"{key}-pp",
                skip=2,
            )
            chunks = passes * args.micro_batches
            bubble = (PIPELINE_SIZE - 1) / (chunks + PIPELINE_SIZE - 1)
            predicted = predicted_seconds(one, passes, args.micro_batches)
            print(
                f"{name:<22}{passes:>3}{one:>10.3f}{piped:>9.3f}{one / piped:>9.2f}x{bubble:>8.1%}"
                f"{predicted:>9.3f}{piped / predicted:>10.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
