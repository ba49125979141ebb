"""The optimizer seam: everything between "the schedule ran backward" and "weights moved".

The training loop only calls `zero_grad()`, `step() -> grad_norm` (no update when it is NaN/inf),
hands `param_groups` to the LR scheduler and `schedule_parts` (the modules the pipeline
schedule runs) to megatron-core's schedule; it never asks which seam it has. Checkpoints
(`checkpoint/checkpointing.py`) ask three questions of a seam: `saves_own_files` (its state is
sharded over ranks and written by every rank with `save(dir)` / read with `load(dir)`;
otherwise it is replicated over data-parallel ranks and travels in `state_dict()`),
`partitions_weights` (the model's weights exist only as partitions: ZeRO-3) and
`load_restores_weights` (`load(dir)` also restores the weights).

* `MegatronCoreOptimizer` (default): megatron-core's `DistributedDataParallel` (gradients
  accumulated into fp32 buffers and averaged over the data-parallel group by
  `finalize_model_grads`) and `get_megatron_optimizer` (Adam with fp32 main weights under
  `--bf16`/`--fp16`, dynamic loss scaling under `--fp16`, global-norm clipping across
  tensor/pipeline shards; `--use-distributed-optimizer` shards the optimizer state over the
  data-parallel group as ZeRO-1 does).
* `DeepSpeedOptimizer` (`--deepspeed`, `parallel/deepspeed_engine.py`): a ZeRO 1/2/3 engine.

The LR/weight-decay schedule is megatron-core's `OptimizerParamScheduler`, which only needs
`param_groups` (with `wd_mult` 0 for vectors: norm weights, biases), so Megatron-LM's
`--lr-decay-style` semantics carry over unchanged.
"""

from __future__ import annotations

import os

import torch
from megatron.core import dist_checkpointing
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride

from megatron_lcot import compat, parallel
from megatron_lcot.model.halting import is_router_param
from megatron_lcot.run_config import OptimizerSection, RunConfig

OPTIMIZER_DIRNAME = "optimizer"


def _one_or_list(items: list):
    """megatron-core's schedules take one hook for one model chunk, a list for several."""
    return items[0] if len(items) == 1 else items


def router_config_overrides(optimizer_config: OptimizerConfig, router_lr_mult: float) -> dict:
    """megatron-core's standard overrides (no weight decay on vectors) plus the halting router's
    own group (`halting.is_router_param`): `max_lr`/`min_lr` scaled by
    `--halting-router-lr-mult` and no weight decay (docs/method.md, the stable adaptive recipe).
    OptimizerParamScheduler reads these per group."""
    router = ParamKey(
        with_name_predicate=ParamWithNamePredicate(
            name="halting_router", fn=lambda param, name: is_router_param(name, param)
        )
    )
    # is_decoupled_lr marks the group as one with its own LR (it is what the router group is):
    # megatron-core 0.16.1 matches saved to live groups on (wd_mult, lr_mult, is_expert_parallel,
    # is_decoupled_lr) only, and without it the router group and the vectors group (both
    # wd_mult 0) collide on resume ("doesn't match the size of optimizer's group").
    return {
        **get_standard_config_overrides(config=optimizer_config),
        router: ParamGroupOverride(
            max_lr=optimizer_config.lr * router_lr_mult,
            min_lr=optimizer_config.min_lr * router_lr_mult,
            wd_mult=0.0,
            is_decoupled_lr=True,
        ),
    }


class MegatronCoreOptimizer:
    """megatron-core DDP wrappers around the model parts and a megatron optimizer over them.

    The wrappers are what the schedule runs (`schedule_parts`); the model config gets the
    hooks the schedule calls: `no_sync_func` (no reduction between micro-batches),
    `finalize_model_grads_func` (the data-parallel reduction after the last one) and, under
    `--fp16`, `grad_scale_func` (the dynamic loss scale).
    """

    def __init__(self, model_parts: list, run_config: RunConfig) -> None:
        config = model_parts[0].config
        # overlap: each gradient bucket is reduced as soon as backward fills it, and with the
        # distributed optimizer each weight bucket is all-gathered in the forward pre-hook of its
        # first module (megatron-core's DDP); the collectives then hide behind compute.
        # Latent passes under pipeline parallelism run a stage's weights once per pass (virtual
        # chunks sharing them): a bucket's gradients arrive once per pass, which the overlapped
        # reduction (one reduction per bucket and backward) cannot follow. Those runs reduce
        # after the schedule, as with --no-overlap-grad-reduce.
        overlap = run_config.parallel.overlap_grad_reduce and not (
            run_config.parallel.pipeline_model_parallel_size > 1 and run_config.model.latent_steps > 0
        )
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=run_config.parallel.use_distributed_optimizer,
            overlap_grad_reduce=overlap,
            overlap_param_gather=overlap
            and run_config.parallel.use_distributed_optimizer
            and run_config.parallel.overlap_param_gather,
        )
        dtype = (
            torch.bfloat16
            if run_config.model.bf16
            else torch.float16
            if run_config.model.fp16
            else torch.float32
        )
        optimizer_config = OptimizerConfig(
            optimizer="adam",
            lr=run_config.optimizer.lr,
            min_lr=run_config.optimizer.min_lr,
            weight_decay=run_config.optimizer.weight_decay,
            adam_beta1=run_config.optimizer.adam_beta1,
            adam_beta2=run_config.optimizer.adam_beta2,
            adam_eps=run_config.optimizer.adam_eps,
            clip_grad=run_config.optimizer.clip_grad,
            bf16=run_config.model.bf16,
            fp16=run_config.model.fp16,
            params_dtype=dtype,
            loss_scale=run_config.optimizer.loss_scale,
            initial_loss_scale=run_config.optimizer.initial_loss_scale,
            use_distributed_optimizer=run_config.parallel.use_distributed_optimizer,
        )
        with parallel.schedule_device_context():
            self.schedule_parts = [
                DistributedDataParallel(config, ddp_config, module=part) for part in model_parts
            ]
            self.optimizer = get_megatron_optimizer(
                optimizer_config,
                self.schedule_parts,
                config_overrides=router_config_overrides(
                    optimizer_config, run_config.optimizer.halting_router_lr_mult
                ),
            )
        config.no_sync_func = _one_or_list([part.no_sync for part in self.schedule_parts])
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss if run_config.model.fp16 else None
        self.saves_own_files = run_config.parallel.use_distributed_optimizer

    partitions_weights = False
    load_restores_weights = False

    def sync_params(self) -> None:
        """Finish the weights' all-gather now. With overlapped parameter gathering a step leaves
        the model's weights to be gathered in the next forward; a checkpoint needs them now."""
        with parallel.schedule_device_context():
            for part in self.schedule_parts:
                if part.use_forward_hook:
                    part.disable_forward_pre_hook(param_sync=True)
                    part.enable_forward_pre_hook()

    @property
    def param_groups(self) -> list:
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        for part in self.schedule_parts:
            part.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self) -> float:
        """Apply one update from the reduced gradients; returns the pre-clip grad norm. No
        update when it is NaN/inf, nor when `--fp16` found an overflow (then nan).

        megatron-core's own `step()` with one check added (`compat.step_unless_nonfinite`)."""
        with parallel.schedule_device_context():
            return compat.step_unless_nonfinite(self.optimizer)

    def state_dict(self) -> dict:
        """Optimizer state (fp32 main weights and Adam moments, loss scaler) without
        `--use-distributed-optimizer`: the same on every data-parallel rank."""
        with parallel.schedule_device_context():
            return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the state of an optimizer built by the same code at the same layout (the
        router's group is told apart by `is_decoupled_lr`, see router_config_overrides)."""
        with parallel.schedule_device_context():
            self.optimizer.load_state_dict(state_dict["optimizer"])

    def _sharded_state_dict(self, is_loading: bool) -> dict:
        """megatron-core's sharded state of the distributed optimizer in its `dp_reshardable`
        form: each data-parallel rank's contiguous shard of main weights and Adam moments is
        one slice of a ShardedTensor, saved and read by that rank alone (no gather). Its
        `fully_reshardable` form all-gathers the whole state on every rank to save it."""
        model_state = {}
        for index, part in enumerate(self.schedule_parts):
            model_state.update(
                {f"model{index}.{key}": value for key, value in part.module.sharded_state_dict().items()}
            )
        return self.optimizer.sharded_state_dict(
            model_state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"}
        )

    def save(self, directory: str) -> None:
        """Write the distributed optimizer's shards to `directory/optimizer` (collective)."""
        os.makedirs(os.path.join(directory, OPTIMIZER_DIRNAME), exist_ok=True)
        with parallel.schedule_device_context():
            dist_checkpointing.save(
                self._sharded_state_dict(is_loading=False), os.path.join(directory, OPTIMIZER_DIRNAME)
            )

    @torch.no_grad()  # the distributed optimizer copies into views of leaf parameters
    def load(self, directory: str) -> None:
        """Read what `save(directory)` wrote, into an optimizer of the same layout (collective).
        megatron-core 0.16.1 needs the Adam state prepared around the load
        (`compat.load_distributed_optimizer`)."""
        with parallel.schedule_device_context():
            compat.load_distributed_optimizer(
                self.optimizer,
                lambda: self._sharded_state_dict(is_loading=True),
                os.path.join(directory, OPTIMIZER_DIRNAME),
            )


def build_optimizer(model_parts: list, run_config: RunConfig):
    """The optimizer seam the flags ask for: DeepSpeed ZeRO under `--deepspeed`, else
    megatron-core DDP + its optimizer."""
    if run_config.parallel.deepspeed:
        from megatron_lcot.parallel.deepspeed_engine import DeepSpeedOptimizer

        return DeepSpeedOptimizer(model_parts, run_config)
    return MegatronCoreOptimizer(model_parts, run_config)


def build_lr_scheduler(optimizer, schedule: OptimizerSection, train_iters: int) -> OptimizerParamScheduler:
    """Linear warm-up from 0 over `schedule.lr_warmup_iters`, then `lr_decay_style` down to
    `min_lr` at `train_iters`; constant weight decay. Stepped once per iteration."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=schedule.lr,
        min_lr=schedule.min_lr,
        lr_warmup_steps=schedule.lr_warmup_iters,
        lr_decay_steps=train_iters,
        lr_decay_style=schedule.lr_decay_style,
        start_wd=schedule.weight_decay,
        end_wd=schedule.weight_decay,
        wd_incr_steps=train_iters,
        wd_incr_style="constant",
    )
