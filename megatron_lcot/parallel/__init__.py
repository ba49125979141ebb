"""The one place that chooses the device and the communication backend.

CUDA + NCCL when a GPU is visible, CPU + gloo otherwise. Nothing else in the project calls
`.cuda()` or names a backend: ask `device()` / `backend()` here.

megatron-core 0.16.1 hard-codes CUDA in a few places (current device, RNG state, the default
causal mask, `device="cuda"` tensors created inline by the pipeline schedules). On a machine
without CUDA, `initialize()` installs the shim of `megatron_lcot/compat.py` that sends those to
the CPU and `destroy()` removes it; on CUDA machines nothing is patched. See
docs/architecture.md ("CPU support").

The package's other modules are the data-parallel engines behind one optimizer seam:
optimizer.py (megatron-core DDP and optimizer, LR schedule), deepspeed_config.py and
deepspeed_engine.py (DeepSpeed ZeRO).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket

import torch
import torch.distributed as dist

from megatron_lcot import compat


def device() -> torch.device:
    """The device this process computes on: its local GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend() -> str:
    """The torch.distributed backend that matches `device()`."""
    return "nccl" if torch.cuda.is_available() else "gloo"


class WrongDeviceError(RuntimeError):
    """A tensor handed to a collective lives off `device()` (NCCL would fail or hang on it)."""


def _on_device(tensor: torch.Tensor, collective: str) -> None:
    """Refuses a tensor that is not on `device()`, also in a world of one, so that CPU runs
    (where gloo would accept it) catch what would break on GPUs with NCCL."""
    if tensor.device != device():
        raise WrongDeviceError(
            f"{collective} got a tensor on {tensor.device}, but collectives run on "
            f"{device()}: create it with device=parallel.device()."
        )


def all_reduce(tensor: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over `group`: with `all_gather`, the one door our code's collectives
    go through (`_on_device`)."""
    _on_device(tensor, "all_reduce")
    if dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_gather(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """[world, *tensor.shape]: every rank's `tensor` over `group`, in rank order (`_on_device`)."""
    _on_device(tensor, "all_gather")
    world = dist.get_world_size(group)
    if world == 1:
        return tensor.unsqueeze(0)
    gathered = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(gathered, tensor.contiguous(), group=group)
    return torch.stack(gathered)


def is_collective_failure(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another rank died or timed out:
    NCCL raises DistBackendError; gloo raises a RuntimeError from its transport."""
    return isinstance(error, dist.DistBackendError) or (
        isinstance(error, RuntimeError) and "third_party/gloo/gloo/" in str(error)
    )


def free_port() -> int:
    """A TCP port nothing listens on now (other jobs may hold the default 29500)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def schedule_device_context():
    """Context for running megatron-core's schedules and building, stepping and (de)serialising
    its optimizers: a no-op on CUDA."""
    if torch.cuda.is_available():
        return contextlib.nullcontext()
    return compat.CudaToCpuMode()


def initialize(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: float = 30,
) -> None:
    """Initialise torch.distributed, megatron-core's parallel_state and the model-parallel RNG.

    `timeout_minutes` bounds every collective, in the world group and in megatron-core's
    groups alike, so a rank that died or froze makes the others fail instead of hang.

    Works under `torchrun`, the `deepspeed` launcher (RANK/WORLD_SIZE/MASTER_* in the
    environment) and plain `python` (a world of one on a free local port).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    compat.check_versions()
    compat.install_cpu_shim()
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend=backend(), timeout=datetime.timedelta(minutes=timeout_minutes))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            distributed_timeout_minutes=timeout_minutes,
        )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def init_deepspeed_comm() -> None:
    """Let DeepSpeed use the process group `initialize()` created. On the CPU its shared-memory
    all-reduce op (inference only) would be JIT-compiled first (docs/benchmarks.md, "Costs behind
    design choices"): mark it unavailable."""
    import deepspeed

    if not torch.cuda.is_available():
        compat.disable_deepspeed_shm_comm()
    deepspeed.init_distributed(dist_backend=backend(), dist_init_required=False)


def destroy() -> None:
    """Tear down parallel_state and the process group and remove the CPU shim (tests call this
    between cases)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    compat.remove_cpu_shim()
