"""The DeepSpeed ZeRO seam: one engine per model part behind the loop's optimizer interface.

megatron-core's schedule still drives every micro-batch. It calls our `forward_step` with the
engine (through `_ScheduleView`, which shows the schedule the model config without touching the
engine's own `config`), and `engine.forward` hooks its outputs, so the schedule's plain
`torch.autograd.backward` runs ZeRO's backward prologue/epilogue (DeepSpeed's "torch-style
backward"): stage 2/3 reduce-scatter gradients as they are produced, and `step()` (one
`engine.step()` per global batch) finishes the reduction, clips to `--clip-grad` and updates.
No `no_sync_func` / `finalize_model_grads_func` is installed (DeepSpeed owns the reduction);
under `--fp16` the schedule scales each micro-batch's loss with `engine.scale` (dynamic loss
scaling, DeepSpeed's scaler).

The client optimizer is torch's AdamW over two groups (matrices decay, vectors do not, as the
megatron-core seam), so no DeepSpeed op is JIT-compiled and megatron's OptimizerParamScheduler
sets the learning rate through `param_groups`. Checkpoints of the engine (ZeRO-partitioned
optimizer state, fp32 master weights) are written by `save(dir)` / read by `load(dir)`; under
ZeRO-3 these partitions are the only copy of the weights written (nothing is gathered).

A step whose gradients hold a NaN/inf is not applied: the ZeRO optimizers of stages 1-3 check
their reduced gradient partitions (`check_grad_overflow`, on under bf16/fp16) and the global
norm (always) across data- and model-parallel ranks before updating, and report the skip
through `engine.was_step_applied()`, which `step()` turns into a non-finite norm for the loop.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_lcot import parallel
from megatron_lcot.model.halting import is_router_param
from megatron_lcot.parallel.deepspeed_config import effective_config
from megatron_lcot.run_config import OptimizerSection, RunConfig


class _MegatronMpu:
    """megatron-core's parallel_state as the `mpu` DeepSpeed expects (it also asks for the
    model-parallel world size and rank, which parallel_state does not name)."""

    def __getattr__(self, name):
        return getattr(parallel_state, name)

    def get_model_parallel_world_size(self) -> int:
        return torch.distributed.get_world_size(parallel_state.get_model_parallel_group())

    def get_model_parallel_rank(self) -> int:
        return torch.distributed.get_rank(parallel_state.get_model_parallel_group())


class _ScheduleView:
    """The model as megatron-core's schedule and our pipeline code see it: attributes are the
    bare model's (`config` is the TransformerConfig, not the engine's DeepSpeed config dict,
    which `get_attr_wrapped_model` would otherwise reach through the engine's own attribute
    forwarding), while a call goes through the engine so its backward hooks are installed."""

    def __init__(self, engine, config) -> None:
        self.module = engine
        self.config = config

    def __getattr__(self, name):
        return getattr(self.module.module, name)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _adamw(model: torch.nn.Module, optimizer: OptimizerSection) -> torch.optim.AdamW:
    """Client AdamW with megatron-core's groups: matrices decay, vectors do not, and the halting
    router (`halting.is_router_param`) has its own learning rate (x `--halting-router-lr-mult`)
    and no decay; `wd_mult`/`max_lr`/`min_lr` are read by OptimizerParamScheduler."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    router = [p for name, p in named if is_router_param(name, p)]
    rest = [p for name, p in named if not is_router_param(name, p)]
    groups = [
        {"params": [p for p in rest if p.ndim > 1], "weight_decay": optimizer.weight_decay, "wd_mult": 1.0},
        {"params": [p for p in rest if p.ndim <= 1], "weight_decay": 0.0, "wd_mult": 0.0},
    ]
    if router:
        mult = optimizer.halting_router_lr_mult
        groups.append(
            {
                "params": router,
                "weight_decay": 0.0,
                "wd_mult": 0.0,
                "max_lr": optimizer.lr * mult,
                "min_lr": optimizer.min_lr * mult,
            }
        )
    return torch.optim.AdamW(
        groups, lr=optimizer.lr, betas=(optimizer.adam_beta1, optimizer.adam_beta2), eps=optimizer.adam_eps
    )


class DeepSpeedOptimizer:
    """`--deepspeed`: the same interface as `MegatronCoreOptimizer`, backed by DeepSpeed engines."""

    def __init__(self, model_parts: list, run_config: RunConfig) -> None:
        import deepspeed

        if len(model_parts) != 1:
            raise ValueError(
                "--deepspeed drives one model part per rank; virtual pipeline chunks are not supported"
            )
        parallel.init_deepspeed_comm()
        part = model_parts[0]
        config = part.config
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=part,
            optimizer=_adamw(part, run_config.optimizer),
            config=effective_config(run_config),
            mpu=_MegatronMpu(),
            dist_init_required=False,
        )
        config.no_sync_func = config.finalize_model_grads_func = None
        config.grad_scale_func = self.engine.scale if run_config.model.fp16 else None
        self.schedule_parts = [_ScheduleView(self.engine, config)]
        self.partitions_weights = self.engine.zero_optimization_partition_weights()

    saves_own_files = True
    load_restores_weights = True

    @property
    def param_groups(self) -> list:
        return self.optimizer.param_groups

    def sync_params(self) -> None:
        """Nothing to finish: the engine's weights are complete (or, under ZeRO-3, saved as
        partitions) when `step()` returns."""

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def step(self) -> float:
        """Finish the gradient reduction, clip, update; returns the pre-clip grad norm, or inf
        when the engine found a NaN/inf gradient and applied nothing (its `skipped_steps`
        counts it too)."""
        self.engine.step()
        if not self.engine.was_step_applied():
            return float("inf")
        return float(self.engine.get_global_grad_norm())

    def state_dict(self) -> dict:
        """Empty: the engine's state is partitioned over ranks and lives in `save(dir)`'s files."""
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass

    def save(self, directory: str) -> None:
        """Write the engine's checkpoint (all ranks: each writes its ZeRO partition)."""
        self.engine.save_checkpoint(directory, tag="deepspeed", save_latest=False)

    def load(self, directory: str) -> None:
        """Restore weights, ZeRO-partitioned optimizer state and fp32 masters from `save(dir)`.
        The LR schedule is ours (OptimizerParamScheduler), so DeepSpeed's is not loaded."""
        path, _ = self.engine.load_checkpoint(directory, tag="deepspeed", load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}/deepspeed")
