"""The optimizer seam: everything between "gradients are in `param.grad`" and "weights moved".

The training loop only calls `zero_grad()`, `step() -> grad_norm`, `state_dict()` and
`load_state_dict()`, and hands `param_groups` to the LR scheduler. `TorchAdamW` implements
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


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """Matrices decay; vectors (norm weights, biases, router biases) do not, as in Megatron-LM.
    `wd_mult` is what OptimizerParamScheduler multiplies the scheduled weight decay by."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0},
    ]


class TorchAdamW:
    """AdamW with data-parallel gradient averaging and global-norm clipping.

    Gradients arrive as each rank's mean over its own micro-batches; `step()` averages them
    over the data-parallel group, computes the global L2 norm across tensor- and
    pipeline-parallel ranks (replicated tensors counted once), clips to `clip_grad`
    (0 = off) and steps.
    """

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple,
                 eps: float, clip_grad: float) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.clip_grad = clip_grad
        self.optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)

    @property
    def param_groups(self) -> list:
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _average_data_parallel_grads(self) -> None:
        group = parallel_state.get_data_parallel_group()
        size = dist.get_world_size(group)
        grads = [p.grad for p in self.params if p.grad is not None]
        if size == 1 or not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        flat /= size
        for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)

    def _global_grad_norm(self) -> float:
        squares = torch.zeros((), dtype=torch.float64)
        for param in self.params:
            if param.grad is not None and param_is_not_tensor_parallel_duplicate(param):
                squares += param.grad.detach().double().pow(2).sum().cpu()
        if dist.get_world_size(parallel_state.get_model_parallel_group()) > 1:
            dist.all_reduce(squares, group=parallel_state.get_model_parallel_group())
        return math.sqrt(squares.item())

    def step(self) -> float:
        """Apply one update from the accumulated gradients; returns the pre-clip grad norm."""
        self._average_data_parallel_grads()
        grad_norm = self._global_grad_norm()
        if self.clip_grad > 0 and grad_norm > self.clip_grad:
            scale = self.clip_grad / (grad_norm + 1e-6)
            for param in self.params:
                if param.grad is not None:
                    param.grad.mul_(scale)
        self.optimizer.step()
        return grad_norm

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)


def build_optimizer(model: torch.nn.Module, args) -> TorchAdamW:
    return TorchAdamW(model, lr=args.lr, weight_decay=args.weight_decay,
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
