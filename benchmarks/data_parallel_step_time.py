"""Step time of each data-parallel layout relative to megatron-core DDP, measured in the same run.

Every layout trains the same model on the same mock tokens with `pretrain_lcot.py` on 2 ranks
(gloo, 1 thread each), launched as a user would: megatron-core DDP and its distributed
optimizer under torchrun, DeepSpeed ZeRO 1/2/3 under the `deepspeed` launcher. The seconds of
each logged iteration come from its --metrics-file (tokens / tokens_per_sec); the first
`--skip` iterations (warm-up) are dropped and the median counts. Layouts run round-robin,
`--repeats` times each, and the best median is kept, so a load change on the machine hits
every layout alike. Prints seconds per step and the ratio to megatron-core DDP.

    .venv/bin/python benchmarks/data_parallel_step_time.py --repeats 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks.pretrain_step_time import median_step_seconds  # noqa: E402
from megatron_lcot.parallel import free_port  # noqa: E402

DS_CONFIGS = os.path.join(REPO_ROOT, "examples", "ds_configs")
BIN = os.path.dirname(sys.executable)


def _torchrun() -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _deepspeed() -> list:
    return [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]


def _zero(stage: int) -> list:
    return [
        "--deepspeed",
        "--deepspeed_config",
        os.path.join(DS_CONFIGS, "zero1.json"),
        "--zero-stage",
        str(stage),
    ]


# name -> (launcher factory, extra flags); the first is the baseline
LAYOUTS = {
    "megatron-core DDP": (_torchrun, []),
    "megatron-core distributed optimizer": (_torchrun, ["--use-distributed-optimizer"]),
    "DeepSpeed ZeRO-1": (_deepspeed, _zero(1)),
    "DeepSpeed ZeRO-2": (_deepspeed, _zero(2)),
    "DeepSpeed ZeRO-3": (_deepspeed, _zero(3)),
}


def _step_seconds(launcher: list, extra: list, model: list, iters: int, skip: int, workdir: str) -> float:
    flags = [
        *model,
        "--mock-data",
        "--vocab-size",
        "1024",
        "--train-iters",
        str(iters),
        "--eval-interval",
        str(iters + 1),
        "--eval-iters",
        "1",
        *extra,
    ]
    return median_step_seconds(launcher, flags, workdir, "metrics", skip)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=2, help="micro-batches per rank per step")
    parser.add_argument("--latent-steps", type=int, default=2, help="adaptive halting when > 0")
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model = [
        "--num-layers",
        str(args.layers),
        "--hidden-size",
        str(args.hidden),
        "--num-attention-heads",
        "4",
        "--seq-length",
        str(args.seq),
        "--micro-batch-size",
        str(args.micro_batch),
        "--global-batch-size",
        str(args.micro_batch * 2 * args.microbatches),
    ]
    if args.latent_steps:
        model += ["--latent-steps", str(args.latent_steps), "--halting", "adaptive"]
    best = {name: float("inf") for name in LAYOUTS}
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(args.repeats):
            for name, (launcher, extra) in LAYOUTS.items():
                seconds = _step_seconds(launcher(), extra, model, args.iters, args.skip, workdir)
                best[name] = min(best[name], seconds)
    baseline = best["megatron-core DDP"]
    print(f"{'layout':<38} {'s/step':>8} {'vs DDP':>7}")
    for name, seconds in best.items():
        print(f"{name:<38} {seconds:8.3f} {seconds / baseline:6.2f}x")


if __name__ == "__main__":
    main()
