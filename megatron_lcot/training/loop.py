"""The training loop, shaped as Megatron-LM's `pretrain()`.

An entry point supplies three functions, as `pretrain_gpt.py` does:

    model_provider(pre_process, post_process) -> model          (one pipeline stage)
    train_valid_test_datasets_provider(num_samples) -> (train, valid, test)
    forward_step(data_iterator, model) -> (output, loss_func)   loss_func(output) ->
        (loss_sum, num_tokens, {"stats": token_statistics(...)})

`pretrain()` builds them once into a `TrainComponents` bundle and keeps the run's progress in
one `TrainState` (`training/state.py`); everything below takes those two objects.

Every step runs megatron-core's `get_forward_backward_func()` (also at PP=1) over
`--global-batch-size / (--micro-batch-size x data-parallel size)` micro-batches, so the
schedule accumulates gradients of the per-token mean loss of each micro-batch divided by
the number of micro-batches. The update itself is behind the optimizer seam
(`training/optimizer.py`). Evaluation runs the same schedule forward-only over the first
`--eval-iters` global batches of the validation split, every `--eval-interval` iterations
and once at the end.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_lcot import parallel
from megatron_lcot.data.datasets import build_data_iterator
from megatron_lcot.model.halting import set_training_iteration
from megatron_lcot.model.pipeline_passes import pipeline_schedule
from megatron_lcot.training.checkpointing import load_checkpoint, save_checkpoint
from megatron_lcot.training.flops_meter import TrainingFlops
from megatron_lcot.training.metrics import MetricsLogger, reduce_statistics, summarize
from megatron_lcot.training.optimizer import build_lr_scheduler, build_optimizer
from megatron_lcot.training.state import TrainComponents, TrainState


def _is_logging_rank() -> bool:
    return dist.get_rank() == dist.get_world_size() - 1


def _run_schedule(components: TrainComponents, data_iterator, args, forward_only: bool):
    """One global batch through the pipeline schedule; the statistics summed over this
    rank's micro-batches and the data-parallel group (None off the last pipeline stage)."""
    with parallel.schedule_device_context(), pipeline_schedule(
            components.optimizer.schedule_parts, data_iterator, args.seq_length, forward_only) as schedule:
        per_microbatch = schedule.forward_backward_func(
            forward_step_func=components.forward_step_func,
            data_iterator=schedule.data_iterator,
            model=schedule.model,
            num_microbatches=args.num_microbatches,
            seq_length=schedule.seq_length,
            micro_batch_size=args.micro_batch_size,
            forward_only=forward_only,
        )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return reduce_statistics(per_microbatch, parallel_state.get_data_parallel_group())


def _data_iterator(dataset, consumed_samples: int, args):
    return build_data_iterator(dataset, consumed_samples, args.micro_batch_size,
                               parallel_state.get_data_parallel_rank(), args.data_parallel_size,
                               args.num_workers)


def evaluate(components: TrainComponents, args) -> dict | None:
    """Means over the first `--eval-iters` validation global batches (None off the last stage)."""
    data_iterator = _data_iterator(components.valid_dataset, 0, args)
    components.train(False)
    total = None
    with torch.no_grad():
        for _ in range(args.eval_iters):
            stats = _run_schedule(components, data_iterator, args, forward_only=True)
            total = stats if total is None else total + stats
    components.train(True)
    return summarize(total) if total is not None else None


def train_step(components: TrainComponents, args) -> tuple:
    """One optimizer step on one global batch: (summed statistics or None, grad norm, lr used)."""
    optimizer = components.optimizer
    optimizer.zero_grad()
    stats = _run_schedule(components, components.train_iterator, args, forward_only=False)
    lr = optimizer.param_groups[0]["lr"]
    grad_norm = optimizer.step()
    components.scheduler.step(1)
    return stats, grad_norm, lr


def _describe_run(components: TrainComponents, args, iteration: int) -> str:
    mode = "vanilla" if args.latent_steps == 0 else (
        f"latent steps {args.latent_steps} ({args.latent_layout}, halting {args.halting})")
    start = f"resuming at iteration {iteration}" if iteration else "starting from scratch"
    return (f"model: {components.parameter_count():,} parameters on this rank | {mode} | "
            f"dp {args.data_parallel_size} tp {args.tensor_model_parallel_size} "
            f"pp {args.pipeline_model_parallel_size} | global batch {args.global_batch_size} = micro "
            f"{args.micro_batch_size} x {args.num_microbatches} micro-batches x dp | {start}")


def train(state: TrainState, components: TrainComponents, args) -> None:
    """Steps `state` to `--train-iters`: logs every `--log-interval`, saves every
    `--save-interval`, evaluates every `--eval-interval` (not at the end: `pretrain` does)."""
    tokens_per_iteration = args.global_batch_size * args.seq_length
    flops = TrainingFlops(components.model_parts[0].config, args.seq_length, args.padded_vocab_size)
    interval_stats, interval_seconds, interval_iters = None, 0.0, 0
    run_start = time.perf_counter()
    while state.iteration < args.train_iters:
        step_start = time.perf_counter()
        for part in components.model_parts:  # halting warm-up (also right after a resume)
            set_training_iteration(part, state.iteration)
        stats, grad_norm, lr = train_step(components, args)
        state.iteration += 1
        state.consumed_train_samples += args.global_batch_size
        interval_seconds += time.perf_counter() - step_start
        interval_iters += 1
        if stats is not None:
            interval_stats = stats if interval_stats is None else interval_stats + stats
        if state.iteration % args.log_interval == 0 or state.iteration == args.train_iters:
            if interval_stats is not None:
                summary = flops.add_interval(state, summarize(interval_stats), interval_iters * tokens_per_iteration)
                components.logger.log_train(
                    state.iteration, state.consumed_train_samples * args.seq_length, lr, grad_norm,
                    summary, tokens_per_sec=interval_iters * tokens_per_iteration / interval_seconds,
                    seconds_per_iter=interval_seconds / interval_iters, elapsed=time.perf_counter() - run_start)
            interval_stats, interval_seconds, interval_iters = None, 0.0, 0
        if args.save and args.save_interval and state.iteration % args.save_interval == 0:
            save_checkpoint(args.save, state, components, args)
        if state.iteration % args.eval_interval == 0 and state.iteration < args.train_iters:
            summary = evaluate(components, args)
            if summary is not None:
                components.logger.log_eval(state.iteration, summary, final=False)


def build_components(args, train_valid_test_datasets_provider, model_provider, forward_step_func) -> tuple:
    """Model, optimizer seam, scheduler (restored from `--load` when given), data and logger:
    (TrainState, TrainComponents)."""
    model = model_provider(pre_process=parallel_state.is_pipeline_first_stage(),
                           post_process=parallel_state.is_pipeline_last_stage()).to(parallel.device())
    model_parts = [model]
    optimizer = build_optimizer(model_parts, args)
    components = TrainComponents(model_parts=model_parts, optimizer=optimizer,
                                 scheduler=build_lr_scheduler(optimizer, args), forward_step_func=forward_step_func)
    state = load_checkpoint(args.load, components, args) if args.load else TrainState()

    samples = [args.train_iters * args.global_batch_size, args.eval_iters * args.global_batch_size, 0]
    train_dataset, components.valid_dataset, _ = train_valid_test_datasets_provider(samples)
    if state.iteration < args.train_iters:
        components.train_iterator = _data_iterator(train_dataset, state.consumed_train_samples, args)
    components.logger = MetricsLogger(args, enabled=_is_logging_rank())
    return state, components


def pretrain(args, train_valid_test_datasets_provider, model_provider, forward_step_func) -> dict | None:
    """Initialise, build, resume, train for `--train-iters`, save, evaluate; returns the final
    validation summary on the logging rank (None elsewhere)."""
    parallel.initialize(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.seed)
    state, components = build_components(args, train_valid_test_datasets_provider, model_provider,
                                         forward_step_func)
    start_iteration = state.iteration
    if _is_logging_rank():
        print(_describe_run(components, args, start_iteration), flush=True)
    train(state, components, args)
    saved_by_interval = args.save_interval and state.iteration % args.save_interval == 0
    if args.save and state.iteration > start_iteration and not saved_by_interval:
        save_checkpoint(args.save, state, components, args)
    final = evaluate(components, args)
    if final is not None:
        components.logger.log_eval(state.iteration, final, final=True)
    components.logger.close()
    return final if _is_logging_rank() else None
