"""Every GPU claim of the project in one run (scripts/gpu_check.sh is the entry point).

1. `train`: each mode (vanilla, stepwise K=2, adaptive K=2, interleaved K=1) trains 20 steps
   of pretrain_lcot.py in bf16 under torchrun (NCCL on CUDA), inside benchmarks/check_run.py:
   SDPA without its math backend, and every core-attention call checked to have a fused CUDA
   kernel; losses must be finite.
2. `throughput`: benchmarks/train_throughput.py --device cuda --size 1b --bf16, with MFU.
3. `memory`: the example config (examples/pretrain_common.sh's model and micro-batch, one GPU,
   megatron-core DDP) trains 3 steps; torch.cuda.max_memory_allocated against
   megatron_lcot.training.memory_estimate of the same flags.
The last line printed is one JSON object with every result and `ok`.

`--cpu-dry-run` runs the same steps at tiny sizes on the CPU (gloo), following CUDA's attention
plan on CPU tensors (2 steps per mode); there is no allocator peak on CPU, so step 3 builds the
example's flags and reports the estimate only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {
    "vanilla": [],
    "stepwise": ["--latent-steps", "2"],
    "adaptive": ["--latent-steps", "2", "--halting", "adaptive", "--halting-threshold", "0.81"],
    "interleaved": ["--latent-steps", "1", "--latent-layout", "interleaved"],
}
# model of the 20-step runs: (GPU, CPU dry run)
TRAIN_MODEL = (
    [
        "--num-layers",
        "12",
        "--hidden-size",
        "768",
        "--num-attention-heads",
        "12",
        "--num-query-groups",
        "4",
        "--ffn-hidden-size",
        "2048",
        "--seq-length",
        "1024",
        "--micro-batch-size",
        "4",
        "--vocab-size",
        "32000",
    ],
    [
        "--num-layers",
        "2",
        "--hidden-size",
        "64",
        "--num-attention-heads",
        "4",
        "--num-query-groups",
        "2",
        "--ffn-hidden-size",
        "128",
        "--seq-length",
        "32",
        "--micro-batch-size",
        "2",
        "--vocab-size",
        "256",
    ],
)
TRAIN_ITERS = (20, 2)
MEMORY_TOLERANCE = 0.10


def run(command: list, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")
    result = subprocess.run(
        [str(c) for c in command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, command[:6]))} ... failed ({result.returncode}):\n{result.stderr[-4000:]}"
        )
    return result


def checked_pretrain(flags: list, workdir: str, name: str, cuda_plan: bool, timeout: float) -> tuple:
    """pretrain_lcot.py under torchrun and check_run.py: (metrics records, check report)."""
    report, metrics = os.path.join(workdir, f"{name}.json"), os.path.join(workdir, f"{name}.jsonl")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    run(
        [
            *torchrun,
            os.path.join(ROOT, "benchmarks", "check_run.py"),
            "--report",
            report,
            *(["--cuda-plan"] if cuda_plan else []),
            os.path.join(ROOT, "pretrain_lcot.py"),
            *flags,
            "--metrics-file",
            metrics,
        ],
        timeout,
    )
    with open(metrics) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    with open(report) as handle:
        return records, json.load(handle)


def train_modes(dry: bool, workdir: str) -> dict:
    model, iters = TRAIN_MODEL[dry], TRAIN_ITERS[dry]
    results = {}
    for mode, flags in MODES.items():
        start = time.time()
        records, report = checked_pretrain(
            [
                *model,
                *flags,
                "--bf16",
                "--mock-data",
                "--train-iters",
                str(iters),
                "--lr",
                "3e-4",
                "--log-interval",
                "1",
                "--eval-interval",
                str(iters),
                "--eval-iters",
                "1",
                "--num-workers",
                "0",
            ],
            workdir,
            mode,
            dry,
            timeout=180,
        )
        train = [r for r in records if r["split"] == "train"]
        assert len(train) == iters, f"{mode}: {len(train)} of {iters} steps logged"
        assert all(math.isfinite(r["loss"]) for r in train), f"{mode}: non-finite loss"
        assert report["num_calls"] > 0, f"{mode}: no core-attention call recorded"
        results[mode] = {
            "steps": len(train),
            "first_loss": train[0]["loss"],
            "last_loss": train[-1]["loss"],
            "attention_calls": report["attention_calls"],
            "seconds": round(time.time() - start, 1),
        }
    return results


def throughput(dry: bool) -> dict:
    flags = (
        [
            "--device",
            "cpu",
            "--size",
            "tiny",
            "--repeats",
            "1",
            "--num-layers",
            "1",
            "--seq-length",
            "32",
            "--micro-batch-size",
            "2",
            "--modes",
            "vanilla,stepwise K=2",
        ]
        if dry
        else ["--device", "cuda", "--size", "1b", "--bf16", "--repeats", "3"]
    )
    result = run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "train_throughput.py"), *flags], timeout=300
    )
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return {
        "mfu": summary["mfu"],
        "vanilla_vs_baseline": summary["vanilla_vs_baseline"],
        "fixed_k_vs_ideal": summary["fixed_k_vs_ideal"],
        "adaptive_all_vs_ideal": summary["adaptive_all_vs_ideal"],
    }


def memory(dry: bool, workdir: str) -> dict:
    """The example's model and micro-batch trained 3 steps on one GPU against the memory
    model's estimate of the same flags. The dry run (no allocator peak on CPU) builds the
    same flags and reports the estimate only."""
    from megatron_lcot.training.memory_estimate import estimate_for_flags, example_flags

    flags = example_flags(ROOT)
    keep = _without(
        flags,
        (
            "--save",
            "--load",
            "--metrics-file",
            "--deepspeed_config",
            "--train-iters",
            "--global-batch-size",
            "--save-interval",
            "--eval-interval",
            "--eval-iters",
            "--log-interval",
            "--lr-warmup-iters",
        ),
        ("--deepspeed",),
    )
    flags = [
        *keep,
        "--mock-data",
        "--vocab-size",
        "32000",
        "--train-iters",
        "3",
        "--log-interval",
        "1",
        "--eval-interval",
        "3",
        "--eval-iters",
        "1",
        "--num-workers",
        "0",
    ]
    shape, estimate = estimate_for_flags(flags, gpus=1)
    out = {
        "flags": " ".join(keep),
        "estimate_gib": estimate["peak"] / 2**30,
        "measured_gib": None,
        "ratio": None,
    }
    if not dry:
        _, report = checked_pretrain(flags, workdir, "memory", False, timeout=300)
        measured = report["max_memory_allocated"]
        out.update(measured_gib=measured / 2**30, ratio=estimate["peak"] / measured)
    return out


def _without(flags: list, with_value: tuple, bare: tuple) -> list:
    out, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag in with_value:
            skip = True
        elif flag not in bare:
            out.append(flag)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="the same steps, tiny, on the CPU")
    args = parser.parse_args()
    import torch

    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; use --cpu-dry-run to check the script on the CPU")
    started = time.time()
    result = {"device": "cpu (dry run)" if dry else torch.cuda.get_device_name()}
    with tempfile.TemporaryDirectory() as workdir:
        for name, step in (
            ("train", lambda: train_modes(dry, workdir)),
            ("throughput", lambda: throughput(dry)),
            ("memory", lambda: memory(dry, workdir)),
        ):
            try:
                result[name] = step()
            except (AssertionError, RuntimeError, subprocess.TimeoutExpired) as error:
                result[name] = {"error": str(error)[-2000:]}
            print(f"gpu_check: {name}: {json.dumps(result[name])[:400]}", file=sys.stderr, flush=True)
    memory_ok = dry or (
        result["memory"].get("ratio") is not None and abs(result["memory"]["ratio"] - 1) <= MEMORY_TOLERANCE
    )
    result["ok"] = (
        all("error" not in result[name] for name in ("train", "throughput", "memory")) and memory_ok
    )
    result["seconds"] = round(time.time() - started, 1)
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
