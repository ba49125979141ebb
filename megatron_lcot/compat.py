"""Every use of another library's private API or undocumented behaviour, in one place.

Written for megatron-core 0.16.1, DeepSpeed 0.19.8, torch 2.13 and lm-eval 0.4.13
(`WRITTEN_FOR`). `check_versions()` (called by `parallel.initialize()`, i.e. by every entry
point) raises `IncompatibleVersionError` when megatron-core's major.minor differs (another
patch release warns): the CPU shim
and the optimizer step below replace megatron-core internals, and a release that changed them
could train silently wrong. Other versions of DeepSpeed, torch and lm-eval only warn: what this
module touches of them fails loudly when it changes (a missing attribute or module), and a
refusal would block users on patch releases for nothing.

What is here, and why:
* the CPU shim (`install_cpu_shim` / `remove_cpu_shim`, `CudaToCpuMode`): megatron-core
  hard-codes CUDA in its RNG tracker, current device, default causal mask and the schedules'
  inline `device="cuda"` tensors; its optimizers check `Tensor.type()` strings. Only on
  machines without CUDA, `install_cpu_shim` replaces those `torch.cuda` and megatron-core
  functions and `remove_cpu_shim` puts the originals back: `parallel.initialize()` installs it
  and `parallel.destroy()` removes it, so it lives as long as megatron-core's parallel state,
  the span in which megatron-core makes these calls (model construction, the RNG tracker,
  checkpointing, the schedules). `CudaToCpuMode` is narrower: a `TorchFunctionMode`
  entered around the schedule and the optimizer (`parallel.schedule_device_context()`).
* `disable_deepspeed_shm_comm`: DeepSpeed's `ops.__compatible_ops__` registry, so that the
  CPU does not JIT-compile a shared-memory all-reduce we never use.
* `use_in_process_results_queue`: dist_checkpointing's module-level `_results_queue`.
* `step_unless_nonfinite`: megatron-core's optimizer step written out with a NaN/inf check.
* `load_distributed_optimizer`: the distributed optimizer's load with the inner Adam state
  allocated before it and every parameter's `step` replaced after it.
* `flash_attention_forward` / `flash_attention_backward`: torch's private flash-attention ops
  (`torch.ops.aten._scaled_dot_product_flash_attention*`), the only ones that return the
  log-sum-exp the causal-block merge needs (model/causal_blocks.py).
* `raise_recompile_limit`: `torch._dynamo.config.recompile_limit` (compiled FlexAttention).
* `default_store`: torch.distributed's `_get_default_store()` (the first-failure record).
* `lm_eval_cli`: lm-eval's `_cli.HarnessCLI` (0.4.13 has no plugin mechanism).
The one private use outside this module is in `hf/modeling_lcot.py`, which must stand alone
(transformers loads it by itself with trust_remote_code): it overrides transformers'
`_prepare_cache_for_generation` hook.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import queue
import warnings

import torch

WRITTEN_FOR = {"megatron-core": "0.16.1", "deepspeed": "0.19.8", "torch": "2.13", "lm_eval": "0.4.13"}
# Another major.minor of these is refused; any other difference is only warned about.
REFUSED_ON_OTHER_MINOR = ("megatron-core",)

# (owner, attribute, original) of each function the CPU shim replaced; None: not installed.
_cpu_shim_originals: list | None = None


class IncompatibleVersionError(RuntimeError):
    """An installed library whose internals this code was not written against."""


def _major_minor(version: str) -> tuple:
    return tuple(version.split("+")[0].split(".")[:2])


def check_versions(packages: tuple = ("megatron-core", "deepspeed", "torch")) -> None:
    """Refuse another megatron-core major.minor, warn on other versions of the rest (packages
    that are not installed are skipped: DeepSpeed and lm-eval are optional)."""
    for package in packages:
        try:
            installed = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
        wanted, version = WRITTEN_FOR[package], installed.split("+")[0]
        if version == wanted or (package == "torch" and _major_minor(version) == _major_minor(wanted)):
            continue
        message = (
            f"{package} {installed} is installed; megatron_lcot was written for {wanted} "
            f"(megatron_lcot/compat.py holds what depends on it); install it with "
            f"pip install '{package}=={wanted}{'.*' if package == 'torch' else ''}'"
        )
        if package in REFUSED_ON_OTHER_MINOR and _major_minor(version) != _major_minor(wanted):
            raise IncompatibleVersionError(message + ".")
        warnings.warn(message + "; continuing.", stacklevel=2)


def _without_rng_fork_warning(record: logging.LogRecord) -> bool:
    """On CPU the "device" RNG that megatron-core forks for tensor-parallel regions *is* the CPU
    RNG, so its warning that the CPU RNG changed inside a fork (weight init) is expected noise."""
    return "CPU RNG state changed" not in record.getMessage()


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _cpu_shim_replacements() -> list:
    """(owner, attribute, CPU replacement) for each hard-coded CUDA call of megatron-core."""
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as tp_random

    return [
        (torch.cuda, "current_device", lambda: torch.device("cpu")),
        (torch.cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state()),
        (torch.cuda, "set_rng_state", lambda state, *a, **k: torch.set_rng_state(state)),
        (torch.cuda, "manual_seed", lambda seed: None),  # the CPU generator: torch.manual_seed
        (torch.cuda, "synchronize", lambda *a, **k: None),
        (
            tp_random,
            "_get_cuda_rng_state",
            lambda *a, clone=False, **k: torch.get_rng_state().clone() if clone else torch.get_rng_state(),
        ),
        (tp_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state)),
        (fused_softmax, "get_default_causal_mask", _cpu_causal_mask),
    ]


def install_cpu_shim() -> None:
    """Route megatron-core's hard-coded CUDA calls to the CPU until `remove_cpu_shim()`
    (CPU-only machines; a no-op when installed already or when CUDA is available)."""
    global _cpu_shim_originals
    if _cpu_shim_originals is not None or torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as tp_random

    replacements = _cpu_shim_replacements()
    _cpu_shim_originals = [(owner, name, getattr(owner, name)) for owner, name, _ in replacements]
    for owner, name, replacement in replacements:
        setattr(owner, name, replacement)
    logging.getLogger(tp_random.__name__).addFilter(_without_rng_fork_warning)


def remove_cpu_shim() -> None:
    """Put back every function `install_cpu_shim()` replaced (a no-op when none is installed)."""
    global _cpu_shim_originals
    if _cpu_shim_originals is None:
        return
    from megatron.core.tensor_parallel import random as tp_random

    for owner, name, original in _cpu_shim_originals:
        setattr(owner, name, original)
    logging.getLogger(tp_random.__name__).removeFilter(_without_rng_fork_warning)
    _cpu_shim_originals = None


class CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Makes megatron-core's CUDA assumptions hold on the CPU while active:
    `device="cuda"` keyword arguments become the CPU (the schedules create
    `torch.zeros(..., device="cuda")` inline), and `Tensor.type()` reports `torch.cuda.*`
    (megatron's optimizers check `param.type()` against "torch.cuda.FloatTensor" and friends
    when they are built, when they clip and when they step)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs["device"] = "cpu"
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def disable_deepspeed_shm_comm() -> None:
    """DeepSpeed's shared-memory all-reduce (inference only) would be JIT-compiled on the CPU
    first (docs/benchmarks.md, "Costs behind design choices"): mark it unavailable in
    DeepSpeed's op registry."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def use_in_process_results_queue() -> None:
    """dist_checkpointing's torch_dist writer collects its (forked) writers' results through a
    queue that by default lives in a *spawned* multiprocessing Manager: a fresh interpreter
    that re-imports `__main__` (slow, and a crash for scripts without a `__main__` guard).
    Saving is synchronous: the results are put and read by this process, so a thread queue
    serves (a multiprocessing one could still be empty when read)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def step_unless_nonfinite(megatron_optimizer) -> float:
    """megatron-core's `MegatronOptimizer.step()` (prepare, norm + clip, update) with one check
    added: its fp32/bf16 optimizers would apply a NaN gradient. Returns the pre-clip grad norm;
    no update when it is NaN/inf, nor when fp16 found an overflow (then nan)."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if megatron_optimizer.prepare_grads():  # fp16 overflow: the loss scaler backed off
        return float("nan")
    grad_norm = float(megatron_optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return grad_norm
    for optimizer in getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer]):
        parameters = optimizer.get_parameters()
        if optimizer.config.clip_grad > 0.0 and parameters:
            clip_grad_by_total_norm_fp32(
                parameters, max_norm=optimizer.config.clip_grad, total_norm=grad_norm
            )
    megatron_optimizer.step_with_ready_grads()
    return grad_norm


def load_distributed_optimizer(megatron_optimizer, sharded_state_dict, path: str) -> None:
    """Load the distributed optimizer's shards at `path` into `megatron_optimizer`.

    megatron-core 0.16.1 on torch's AdamW (no Apex / TE) needs the Adam state allocated before
    it describes what to load (`sharded_state_dict()` reads the step from it), gives every
    parameter one shared `step` tensor from the param groups, then copies the local (not
    loaded) step over it with the shards: so the inner torch optimizer's state is allocated
    first, and every parameter gets its own copy of the saved step afterwards."""
    from megatron.core import dist_checkpointing

    chained = getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer])
    for distributed in chained:
        adam = distributed.optimizer
        for param in (param for group in adam.param_groups for param in group["params"]):
            if not adam.state[param]:
                adam.state[param].update(
                    step=torch.tensor(0.0),
                    exp_avg=torch.zeros_like(param),
                    exp_avg_sq=torch.zeros_like(param),
                )
    loaded = dist_checkpointing.load(sharded_state_dict(), path)
    megatron_optimizer.load_state_dict(loaded)
    saved = loaded if len(chained) == 1 and "optimizer" in loaded else None
    for index, distributed in enumerate(chained):
        groups = (saved or loaded[index])["optimizer"]["param_groups"]
        steps = {group["step"] for group in groups if "step" in group}
        if len(steps) == 1:
            step = steps.pop()
            for entry in distributed.optimizer.state.values():
                entry["step"] = torch.tensor(float(step))


def flash_attention_forward(query, key, value, scale: float) -> tuple:
    """One causal flash-attention call (model/causal_blocks.py) on torch's private op, the only one
    that returns the row log-sum-exp: (output [b, np, T, hn], lse [b, np, T] fp32, what backward needs)."""
    if query.device.type == "cuda":
        output, lse, cum_q, cum_k, max_q, max_k, philox_seed, philox_offset, _ = (
            torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, 0.0, True, False, scale=scale
            )
        )
        return output, lse, (cum_q, cum_k, max_q, max_k, philox_seed, philox_offset)
    output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, True, scale=scale
    )
    return output, lse, None


def flash_attention_backward(grad_output, query, key, value, output, lse, extra, scale: float) -> tuple:
    """Gradients of one causal block given the merged output and log-sum-exp: (dq, dk, dv),
    dk/dv with the key's ng heads (the kernels sum over each group's query heads)."""
    if query.device.type == "cuda":
        cum_q, cum_k, max_q, max_k, philox_seed, philox_offset = extra
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_output,
            query,
            key,
            value,
            output,
            lse,
            cum_q,
            cum_k,
            max_q,
            max_k,
            0.0,
            True,
            philox_seed,
            philox_offset,
            scale=scale,
        )
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_output, query, key, value, output, lse, 0.0, True, scale=scale
    )


def raise_recompile_limit(limit: int) -> None:
    """Let torch.compile keep at least `limit` specialisations of one function (the compiled
    FlexAttention's shape buckets, model/attention.py); `torch._dynamo.config` has no public
    setter in torch 2.13."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)


def default_store():
    """The default process group's key-value store (training/faults.py records a run's first
    failure in it); torch 2.13 has no public accessor."""
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def lm_eval_cli():
    """lm-eval's command-line parser/runner class (private in 0.4.13: `lm_eval._cli`)."""
    check_versions(("lm_eval",))
    from lm_eval._cli import HarnessCLI

    return HarnessCLI
