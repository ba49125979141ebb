"""The optimizer seam: everything between "the schedule ran backward" and "weights moved".

The training loop only calls `zero_grad()`, `step() -> grad_norm` (no update when it is NaN/inf),
`state_dict()` and `load_state_dict()`, hands `param_groups` to the LR scheduler and
`schedule_parts` (the modules the pipeline schedule runs) to megatron-core's schedule; it never asks which seam it has.

* `MegatronCoreOptimizer` (default): megatron-core's `DistributedDataParallel` (gradients
  accumulated into fp32 buffers and averaged over the data-parallel group by
  `finalize_model_grads`) and `get_megatron_optimizer` (Adam with fp32 main weights under
  `--bf16`/`--fp16`, dynamic loss scaling under `--fp16`, global-norm clipping across
  tensor/pipeline shards; `--use-distributed-optimizer` shards the optimizer state over the
  data-parallel group as ZeRO-1 does).
* `DeepSpeedOptimizer` (`--deepspeed`, `training/deepspeed_engine.py`): a ZeRO 1/2/3 engine.

The LR/weight-decay schedule is megatron-core's `OptimizerParamScheduler`, which only needs
`param_groups` (with `wd_mult` 0 for vectors: norm weights, biases), so Megatron-LM's
`--lr-decay-style` semantics carry over unchanged.
"""

from __future__ import annotations

import math

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride

from megatron_lcot import parallel
from megatron_lcot.model.halting import is_router_param


def _one_or_list(items: list):
    """megatron-core's schedules take one hook for one model chunk, a list for several."""
    return items[0] if len(items) == 1 else items


def router_config_overrides(optimizer_config: OptimizerConfig, router_lr_mult: float) -> dict:
    """megatron-core's standard overrides (no weight decay on vectors) plus the halting router's
    own group (`halting.is_router_param`): `max_lr`/`min_lr` scaled by
    `--halting-router-lr-mult` and no weight decay (docs/method.md, the stable adaptive recipe).
    OptimizerParamScheduler reads these per group."""
    router = ParamKey(with_name_predicate=ParamWithNamePredicate(
        name="halting_router", fn=lambda param, name: is_router_param(name, param)))
    # is_decoupled_lr marks the group as one with its own LR (it is what the router group is):
    # megatron-core 0.16.1 matches saved to live groups on (wd_mult, lr_mult, is_expert_parallel,
    # is_decoupled_lr) only, and without it the router group and the vectors group (both
    # wd_mult 0) collide on resume ("doesn't match the size of optimizer's group").
    return {**get_standard_config_overrides(config=optimizer_config),
            router: ParamGroupOverride(max_lr=optimizer_config.lr * router_lr_mult,
                                       min_lr=optimizer_config.min_lr * router_lr_mult, wd_mult=0.0,
                                       is_decoupled_lr=True)}


class MegatronCoreOptimizer:
    """megatron-core DDP wrappers around the model parts and a megatron optimizer over them.

    The wrappers are what the schedule runs (`schedule_parts`); the model config gets the
    hooks the schedule calls: `no_sync_func` (no reduction between micro-batches),
    `finalize_model_grads_func` (the data-parallel reduction after the last one) and, under
    `--fp16`, `grad_scale_func` (the dynamic loss scale).
    """

    def __init__(self, model_parts: list, args) -> None:
        config = model_parts[0].config
        # overlap: each gradient bucket is reduced as soon as backward fills it, and with the
        # distributed optimizer each weight bucket is all-gathered in the forward pre-hook of its
        # first module (megatron-core's DDP); the collectives then hide behind compute.
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=args.use_distributed_optimizer,
            overlap_grad_reduce=args.overlap_grad_reduce,
            overlap_param_gather=args.use_distributed_optimizer and args.overlap_param_gather)
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        optimizer_config = OptimizerConfig(
            optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
            clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16, params_dtype=dtype,
            loss_scale=args.loss_scale, initial_loss_scale=args.initial_loss_scale,
            use_distributed_optimizer=args.use_distributed_optimizer)
        with parallel.schedule_device_context():
            self.schedule_parts = [DistributedDataParallel(config, ddp_config, module=part) for part in model_parts]
            self.optimizer = get_megatron_optimizer(
                optimizer_config, self.schedule_parts,
                config_overrides=router_config_overrides(optimizer_config, args.halting_router_lr_mult))
        config.no_sync_func = _one_or_list([part.no_sync for part in self.schedule_parts])
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss if args.fp16 else None
        self.distributed = args.use_distributed_optimizer

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

        megatron-core's own `step()` (prepare, norm + clip, update) with one check added: its
        fp32/bf16 optimizers would apply a NaN gradient."""
        with parallel.schedule_device_context():
            if self.optimizer.prepare_grads():  # --fp16 overflow: the loss scaler backed off
                return float("nan")
            grad_norm = float(self.optimizer.get_grad_norm())
            if not math.isfinite(grad_norm):
                return grad_norm
            for optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
                parameters = optimizer.get_parameters()
                if optimizer.config.clip_grad > 0.0 and parameters:
                    clip_grad_by_total_norm_fp32(parameters, max_norm=optimizer.config.clip_grad,
                                                 total_norm=grad_norm)
            self.optimizer.step_with_ready_grads()
        return grad_norm

    def state_dict(self) -> dict:
        """Optimizer state (fp32 main weights and Adam moments, loss scaler). With the
        distributed optimizer every data-parallel rank must call this (it gathers the shards
        onto data-parallel rank 0)."""
        with parallel.schedule_device_context():
            state = {"optimizer": self.optimizer.state_dict()}
            if self.distributed:
                state["param_state"] = [chained.get_parameter_state_dp_zero()
                                        for chained in self.optimizer.chained_optimizers]
        return state

    @torch.no_grad()  # the distributed optimizer copies into views of leaf parameters
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the state of an optimizer built by the same code at the same layout (the
        router's group is told apart by `is_decoupled_lr`, see router_config_overrides)."""
        with parallel.schedule_device_context():
            self.optimizer.load_state_dict(state_dict["optimizer"])
            if self.distributed:
                for chained, param_state in zip(self.optimizer.chained_optimizers, state_dict["param_state"],
                                                strict=True):
                    _load_dp_zero_parameter_state(chained, param_state)


def _load_dp_zero_parameter_state(distributed_optimizer, param_state) -> None:
    """`load_parameter_state_from_dp_zero` of megatron-core 0.16.1 on torch's AdamW (no Apex /
    TE) copies every key of the live Adam state from the gathered shards, which carry no
    "step" (it travels in the param groups and `load_state_dict` has already restored it):
    set the steps aside for the copy and give every parameter its own step tensor back
    (a shared one would be advanced once per parameter)."""
    state = distributed_optimizer.optimizer.state
    steps = {param: entry.pop("step") for param, entry in state.items() if "step" in entry}
    distributed_optimizer.load_parameter_state_from_dp_zero(param_state)
    for param, step in steps.items():
        state[param]["step"] = step.clone()


def build_optimizer(model_parts: list, args):
    """The optimizer seam the flags ask for: DeepSpeed ZeRO under `--deepspeed`, else
    megatron-core DDP + its optimizer."""
    if getattr(args, "deepspeed", False):
        from megatron_lcot.training.deepspeed_engine import DeepSpeedOptimizer

        return DeepSpeedOptimizer(model_parts, args)
    return MegatronCoreOptimizer(model_parts, args)


def build_lr_scheduler(optimizer, args) -> OptimizerParamScheduler:
    """Linear warm-up from 0 over `--lr-warmup-iters`, then `--lr-decay-style` down to
    `--min-lr` at `--train-iters`; constant weight decay. Stepped once per iteration."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.train_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
    )
