"""Peak host memory of each rank while it saves a checkpoint, against the model's size.

Trains one step of a vanilla model (mock tokens, bf16) on 2 ranks under the real `deepspeed`
launcher, or torchrun for the megatron seams, and saves it. Inside each rank a thread samples
the resident set size (/proc/self/statm) every 2 ms while `save_checkpoint` runs; the rank
prints its peak minus its size just before the save. glibc's malloc would keep the memory that
training freed resident and hand it out again, hiding new allocations from the RSS, so the
ranks run with `MALLOC_MMAP_THRESHOLD_` at 64 KiB: every tensor larger than that is its own
mapping, returned to the system when freed. A save that gathered the model on one
rank would grow that rank by the whole model; a partitioned save grows it by its own shard at
most (plus what serialisation copies). Host memory is where CPU ranks keep their tensors; on
GPUs the same gather would land in device memory.

    .venv/bin/python benchmarks/checkpoint_save_memory.py [--layout zero3] [--hidden-size 512]
    (internal: --rank-worker runs inside each rank)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

LAYOUTS = {
    "zero3": [
        "--deepspeed",
        "--deepspeed_config",
        os.path.join(REPO_ROOT, "examples", "ds_configs", "zero3.json"),
    ],
    "zero2": [
        "--deepspeed",
        "--deepspeed_config",
        os.path.join(REPO_ROOT, "examples", "ds_configs", "zero2.json"),
    ],
    "distributed_optimizer": ["--use-distributed-optimizer"],
    "ddp": [],
}
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _rank_worker(argv: list) -> None:
    """Inside one rank: pretrain_lcot.py with `save_checkpoint` measured."""
    import pretrain_lcot
    from megatron_lcot.training import loop

    save = loop.save_checkpoint

    def measured_save(root, train_state, components, args):
        before, peak, done = _rss_bytes(), [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _rss_bytes())
                time.sleep(0.002)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            return save(root, train_state, components, args)
        finally:
            done.set()
            sampler.join()
            parameters = sum(
                getattr(p, "ds_numel", p.numel())
                for part in components.model_parts
                for p in part.parameters()
            )
            print(
                f"SAVE_MEMORY rank {os.environ.get('RANK')} parameters {parameters} before_mib "
                f"{before / 2**20:.1f} peak_growth_mib {(max(peak[0], before) - before) / 2**20:.1f}",
                flush=True,
            )

    loop.save_checkpoint = measured_save
    pretrain_lcot.main(argv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=list(LAYOUTS), default="zero3")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=32000)
    options = parser.parse_args()
    from megatron_lcot.parallel import free_port

    h = options.hidden_size
    with tempfile.TemporaryDirectory() as tmp:
        flags = [
            "--num-layers",
            options.num_layers,
            "--hidden-size",
            h,
            "--num-attention-heads",
            h // 64,
            "--ffn-hidden-size",
            4 * h,
            "--seq-length",
            128,
            "--mock-data",
            "--vocab-size",
            options.vocab_size,
            "--micro-batch-size",
            1,
            "--global-batch-size",
            2,
            "--train-iters",
            1,
            "--lr",
            1e-4,
            "--bf16",
            "--eval-iters",
            1,
            "--save",
            os.path.join(tmp, "ckpt"),
            *LAYOUTS[options.layout],
        ]
        if options.layout.startswith("zero"):
            launcher = [
                os.path.join(os.path.dirname(sys.executable), "deepspeed"),
                "--num_gpus",
                "2",
                "--master_port",
                str(free_port()),
            ]
        else:
            launcher = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
            ]
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": REPO_ROOT,
            "MALLOC_MMAP_THRESHOLD_": "65536",
        }
        result = subprocess.run(
            [*launcher, os.path.abspath(__file__), "--rank-worker", *map(str, flags)],
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            sys.exit(result.stderr[-3000:])
        lines = sorted(line for line in result.stdout.splitlines() if line.startswith("SAVE_MEMORY"))
        for line in lines:
            _, _, rank, _, parameters, _, before, _, growth = line.split()
            model_mib = int(parameters) * 2 / 2**20  # bf16 weights
            print(
                f"{options.layout}: rank {rank} | model {int(parameters) / 1e6:.1f}M parameters = "
                f"{model_mib:.0f} MiB in bf16 | RSS before the save {float(before):.0f} MiB | peak growth "
                f"during the save {float(growth):.1f} MiB = {float(growth) / model_mib:.2f}x the bf16 model"
            )


if __name__ == "__main__":
    if "--rank-worker" in sys.argv:  # the deepspeed launcher puts --local_rank=N first
        _rank_worker([arg for arg in sys.argv[1:] if arg != "--rank-worker"])
    else:
        main()
