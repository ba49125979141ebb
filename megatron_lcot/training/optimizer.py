"""The optimizer seam: everything between "gradients are in `param.grad`" and "weights moved".

The training loop only calls `zero_grad()`, `step() -> grad_norm` (no update when it is NaN/inf),
`state_dict()` and `load_state_dict()`, hands `param_groups` to the LR scheduler and `schedule_parts`
(the modules the pipeline schedule runs) to megatron-core's schedule. `TorchAdamW` implements
that with plain PyTorch (data-parallel gradient averaging, global-norm clipping that counts
tensor-parallel shards once); a DeepSpeed ZeRO engine plugs in behind the same four methods.

The LR/weight-decay schedule is megatron-core's `OptimizerParamScheduler`, which only needs
`param_groups`, so Megatron-LM's `--lr-decay-style` semantics carry over unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from megatron_lcot import parallel


def _param_groups(main_params: list, weight_decay: float) -> list:
    """Matrices decay; vectors (norm weights, biases, router biases) do not, as in Megatron-LM.
    `wd_mult` is what OptimizerParamScheduler multiplies the scheduled weight decay by."""
    return [
        {"params": [p for p in main_params if p.ndim > 1], "weight_decay": weight_decay, "wd_mult": 1.0},
        {"params": [p for p in main_params if p.ndim <= 1], "weight_decay": 0.0, "wd_mult": 0.0},
    ]


class TorchAdamW:
    """AdamW on fp32 main weights, with data-parallel gradient averaging and global-norm clipping.

    fp32 model parameters are their own main weights. A bf16 parameter (`--bf16`) gets an fp32
    main copy: its gradient is upcast into the copy, AdamW updates the copy, and the result is
    cast back (Megatron-LM's mixed-precision optimizer, without loss scaling, which bf16 does
    not need).

    Gradients arrive as each rank's mean over its own micro-batches; `step()` averages them
    over the data-parallel group, computes the global L2 norm across tensor- and
    pipeline-parallel ranks (replicated tensors counted once), clips to `clip_grad`
    (0 = off) and steps.
    """

    def __init__(self, model_parts: list, lr: float, weight_decay: float, betas: tuple,
                 eps: float, clip_grad: float) -> None:
        self.schedule_parts = model_parts
        self.params = [p for part in model_parts for p in part.parameters() if p.requires_grad]
        self.main_params = [p if p.dtype == torch.float32 else p.detach().float() for p in self.params]
        self.clip_grad = clip_grad
        self.optimizer = torch.optim.AdamW(_param_groups(self.main_params, weight_decay), lr=lr, betas=betas, eps=eps)

    @property
    def param_groups(self) -> list:
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        for param, main in zip(self.params, self.main_params):
            param.grad = main.grad = None

    def _main_grads(self) -> list:
        """Point every main weight's .grad at an fp32 copy of its model gradient."""
        for param, main in zip(self.params, self.main_params):
            if main is not param and param.grad is not None:
                main.grad = param.grad.float()
        return [main.grad for main in self.main_params if main.grad is not None]

    def _average_data_parallel(self, grads: list) -> None:
        group = parallel_state.get_data_parallel_group()
        size = dist.get_world_size(group)
        if size == 1 or not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        parallel.all_reduce(flat, group)
        flat /= size
        for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)

    def _global_grad_norm(self) -> float:
        squares = torch.zeros((), dtype=torch.float64, device=parallel.device())
        for param, main in zip(self.params, self.main_params):
            if main.grad is not None and param_is_not_tensor_parallel_duplicate(param):
                squares += main.grad.detach().double().pow(2).sum()
        parallel.all_reduce(squares, parallel_state.get_model_parallel_group())
        return math.sqrt(squares.item())

    @torch.no_grad()
    def step(self) -> float:
        """Apply one update from the accumulated gradients; returns the pre-clip grad norm.
        A NaN/inf norm applies no update (the loop counts the step as skipped)."""
        grads = self._main_grads()
        self._average_data_parallel(grads)
        grad_norm = self._global_grad_norm()
        if not math.isfinite(grad_norm):
            return grad_norm
        if self.clip_grad > 0 and grad_norm > self.clip_grad:
            scale = self.clip_grad / (grad_norm + 1e-6)
            for grad in grads:
                grad.mul_(scale)
        self.optimizer.step()
        for param, main in zip(self.params, self.main_params):
            if main is not param:
                param.copy_(main)
        return grad_norm

    def state_dict(self) -> dict:
        """AdamW state plus the fp32 main copies of low-precision weights (exact resume)."""
        return {"adamw": self.optimizer.state_dict(),
                "fp32_main_params": [main for param, main in zip(self.params, self.main_params) if main is not param]}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict["adamw"])
        copies = [main for param, main in zip(self.params, self.main_params) if main is not param]
        for main, saved in zip(copies, state_dict["fp32_main_params"], strict=True):
            main.copy_(saved)


def build_optimizer(model_parts: list, args) -> TorchAdamW:
    return TorchAdamW(model_parts, lr=args.lr, weight_decay=args.weight_decay,
                      betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, clip_grad=args.clip_grad)


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
