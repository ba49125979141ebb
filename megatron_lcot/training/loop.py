"""The training loop, shaped as Megatron-LM's `pretrain()`.

An entry point supplies three functions, as `pretrain_gpt.py` does:

    model_provider(config, pre_process, post_process) -> model          (one pipeline stage)
    train_valid_test_datasets_provider(config, num_samples) -> (train, valid, test)
    forward_step(config, data_iterator, model, halting) -> (output, loss_func)
        loss_func(output) -> (loss_sum, num_tokens, {"stats": token_statistics(...)})

Each receives the run's `RunConfig` (run_config.py), the one configuration of the run, first.

`pretrain()` builds them once into a `TrainComponents` bundle and keeps the run's progress in
one `TrainState` (`training/state.py`); everything below takes those two objects.

Every step runs megatron-core's `get_forward_backward_func()` (also at PP=1) over
`--global-batch-size / (--micro-batch-size x data-parallel size)` micro-batches, so the
schedule accumulates gradients of the per-token mean loss of each micro-batch divided by
the number of micro-batches. The update itself is behind the optimizer seam
(`parallel/optimizer.py`); a step whose loss or grad norm is not finite applies none, and
signals, time and iteration limits stop the run after a step (`training/faults.py`). Evaluation runs the same schedule forward-only over the first
`--eval-iters` global batches of the validation split, every `--eval-interval` iterations
and once at the end.
"""

from __future__ import annotations

import math
import time
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_lcot import parallel
from megatron_lcot.checkpoint.checkpointing import (
    check_resumable,
    check_weights_loadable,
    holds_initial_weights,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)
from megatron_lcot.data.datasets import build_data_iterator
from megatron_lcot.model.halting_schedule import HaltingSchedule, HaltingSettings
from megatron_lcot.parallel.optimizer import build_lr_scheduler, build_optimizer
from megatron_lcot.parallel.pipeline_passes import pipeline_schedule
from megatron_lcot.run_config import RunConfig
from megatron_lcot.training.compiled_layers import compile_decoder_layers
from megatron_lcot.training.faults import RunGuard, TooManySkippedSteps
from megatron_lcot.training.flops_meter import TrainingFlops
from megatron_lcot.training.metrics import MetricsLogger, reduce_statistics, summarize
from megatron_lcot.training.state import TrainComponents, TrainState


def _is_logging_rank() -> bool:
    return dist.get_rank() == dist.get_world_size() - 1


def _run_schedule(
    components: TrainComponents,
    data_iterator,
    config: RunConfig,
    forward_only: bool,
    halting: HaltingSettings | None,
):
    """One global batch through the pipeline schedule; the statistics summed over this
    rank's micro-batches and the data-parallel group (None off the last pipeline stage).
    halting: the training iteration's settings, handed to every micro-batch's forward."""
    with (
        parallel.schedule_device_context(),
        pipeline_schedule(
            components.optimizer.schedule_parts, data_iterator, config.model.seq_length, forward_only
        ) as schedule,
    ):
        per_microbatch = schedule.forward_backward_func(
            forward_step_func=partial(components.forward_step_func, halting=halting),
            data_iterator=schedule.data_iterator,
            model=schedule.model,
            num_microbatches=config.training.num_microbatches,
            seq_length=schedule.seq_length,
            micro_batch_size=config.training.micro_batch_size,
            forward_only=forward_only,
        )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return reduce_statistics(per_microbatch, parallel_state.get_data_parallel_group())


def _data_iterator(dataset, consumed_samples: int, config: RunConfig):
    return build_data_iterator(
        dataset,
        consumed_samples,
        config.training.micro_batch_size,
        parallel_state.get_data_parallel_rank(),
        config.parallel.data_parallel_size,
        config.data.num_workers,
        pin_memory=parallel.device().type == "cuda",
    )


def evaluate(components: TrainComponents, config: RunConfig) -> dict | None:
    """Means over the first `--eval-iters` validation global batches (None off the last stage)."""
    data_iterator = _data_iterator(components.valid_dataset, 0, config)
    components.train(False)
    total = None
    with torch.no_grad():
        for _ in range(config.training.eval_iters):
            stats = _run_schedule(components, data_iterator, config, forward_only=True, halting=None)
            total = stats if total is None else total + stats
    components.train(True)
    return summarize(total) if total is not None else None


def train_step(
    state: TrainState,
    components: TrainComponents,
    guard: RunGuard,
    config: RunConfig,
    halting: HaltingSettings,
) -> tuple:
    """One optimizer step on one global batch at the halting settings `halting`: (summed
    statistics or None, grad norm, lr used, the ranks' StepVerdict). No update and no LR step
    when the loss or grad norm is not finite; `state` counts those steps."""
    optimizer = components.optimizer
    optimizer.zero_grad()
    stats = _run_schedule(components, components.train_iterator, config, forward_only=False, halting=halting)
    lr = optimizer.param_groups[0]["lr"]
    verdict = guard.agree(summarize(stats)["loss"] if stats is not None else None)
    grad_norm = optimizer.step() if verdict.loss_is_finite else math.nan
    applied = verdict.loss_is_finite and math.isfinite(grad_norm)
    if applied:
        components.scheduler.step(1)
    guard.record_update(state, applied)
    return stats, grad_norm, lr, verdict


def _describe_run(components: TrainComponents, config: RunConfig, iteration: int) -> str:
    model, layout, training = config.model, config.parallel, config.training
    mode = (
        "vanilla"
        if model.latent_steps == 0
        else f"latent steps {model.latent_steps} ({model.latent_layout}, halting {model.halting})"
    )
    start = f"resuming at iteration {iteration}" if iteration else "starting from scratch"
    return (
        f"model: {components.parameter_count():,} parameters on this rank | {mode} | "
        f"dp {layout.data_parallel_size} tp {layout.tensor_model_parallel_size} "
        f"pp {layout.pipeline_model_parallel_size} | global batch {training.global_batch_size} = micro "
        f"{training.micro_batch_size} x {training.num_microbatches} micro-batches x dp | {start}"
    )


def train(state: TrainState, components: TrainComponents, guard: RunGuard, config: RunConfig) -> str | None:
    """Steps `state` to `--train-iters`: logs every `--log-interval`, saves every
    `--save-interval`, evaluates every `--eval-interval` (not at the end: `pretrain` does).
    Returns why it stopped early (`guard.stop_reason`), or None."""
    tokens_per_iteration = config.training.global_batch_size * config.model.seq_length
    flops = TrainingFlops(
        components.model_parts[0].config, config.model.seq_length, config.model.padded_vocab_size
    )
    interval_stats, interval_seconds, interval_iters = None, 0.0, 0
    # the halting settings follow the loop's own counter (also right after a resume)
    halting_schedule = HaltingSchedule(components.model_parts[0].config)
    run_start = time.perf_counter()
    while state.iteration < config.training.train_iters:
        step_start = time.perf_counter()
        halting = halting_schedule.at(state.iteration)
        stats, grad_norm, lr, verdict = train_step(state, components, guard, config, halting)
        state.iteration += 1
        state.consumed_train_samples += config.training.global_batch_size
        interval_seconds += time.perf_counter() - step_start
        interval_iters += 1
        if stats is not None:
            interval_stats = stats if interval_stats is None else interval_stats + stats
        if (
            state.iteration % config.logging.log_interval == 0
            or state.iteration == config.training.train_iters
        ):
            if interval_stats is not None:
                summary = flops.add_interval(
                    state, summarize(interval_stats), interval_iters * tokens_per_iteration
                )
                components.logger.log_train(
                    state.iteration,
                    state.consumed_train_samples * config.model.seq_length,
                    lr,
                    grad_norm,
                    summary,
                    tokens_per_sec=interval_iters * tokens_per_iteration / interval_seconds,
                    seconds_per_iter=interval_seconds / interval_iters,
                    elapsed=time.perf_counter() - run_start,
                )
            interval_stats, interval_seconds, interval_iters = None, 0.0, 0
        if state.skipped_steps_in_a_row and _is_logging_rank():
            print(
                f"iteration {state.iteration}: skipped the update (loss or grad norm not finite: grad norm "
                f"{grad_norm}); {state.skipped_steps_in_a_row} in a row, {state.skipped_steps_total} in all",
                flush=True,
            )
        if (
            config.checkpoint.save
            and config.checkpoint.save_interval
            and state.iteration % config.checkpoint.save_interval == 0
        ):
            save_checkpoint(config.checkpoint.save, state, components, config)
        stop_reason = guard.stop_reason(state, verdict)
        if stop_reason is not None:
            return stop_reason
        if (
            state.iteration % config.training.eval_interval == 0
            and state.iteration < config.training.train_iters
        ):
            summary = evaluate(components, config)
            if summary is not None:
                components.logger.log_eval(state.iteration, summary, final=False)
    return None


def build_components(
    config: RunConfig, train_valid_test_datasets_provider, model_provider, forward_step_func
) -> tuple:
    """Model, optimizer seam, scheduler (restored from `--load` when given; with --skip-train
    only the weights, from a checkpoint of any layout), data and logger: (TrainState,
    TrainComponents). Each provider receives `config` first (module docstring)."""
    load = config.checkpoint.load
    starts_from_weights = load and not config.training.skip_train and holds_initial_weights(load)
    if load and not config.training.skip_train and not starts_from_weights:
        check_resumable(load, config)
    model = model_provider(
        config,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    ).to(parallel.device())
    if config.training.torch_compile:
        compile_decoder_layers(model)
    model_parts = [model]
    if starts_from_weights:  # before the optimizer copies them (fp32 main weights, ZeRO partitions)
        load_model_weights(load, model_parts)
    optimizer = build_optimizer(model_parts, config)
    components = TrainComponents(
        model_parts=model_parts,
        optimizer=optimizer,
        scheduler=build_lr_scheduler(optimizer, config.optimizer, config.training.train_iters),
        forward_step_func=partial(forward_step_func, config),
    )
    if config.training.skip_train:
        state = TrainState(iteration=load_model_weights(load, model_parts))
    else:
        state = load_checkpoint(load, components, config, TrainState()) if load else TrainState()

    training = config.training
    samples = [
        training.train_iters * training.global_batch_size,
        training.eval_iters * training.global_batch_size,
        0,
    ]
    train_dataset, components.valid_dataset, _ = train_valid_test_datasets_provider(config, samples)
    if state.iteration < training.train_iters:
        components.train_iterator = _data_iterator(train_dataset, state.consumed_train_samples, config)
    components.logger = MetricsLogger(
        config.logging,
        training.train_iters,
        enabled=_is_logging_rank(),
        wandb_dir=config.checkpoint.save,
        wandb_config=config.to_dict(),
    )
    return state, components


def pretrain(
    config: RunConfig, train_valid_test_datasets_provider, model_provider, forward_step_func
) -> dict | None:
    """Initialise, build, resume, train for `--train-iters`, save, evaluate; returns the final
    validation summary on the logging rank (None elsewhere, and when the run stopped early).
    --skip-train: load the weights and evaluate only. Raises TooManySkippedSteps (after
    saving) when steps keep producing NaN/inf. A checkpoint of weights (--skip-train, or initial
    weights) decides the padded vocabulary (`check_weights_loadable`) before anything is built."""
    load = config.checkpoint.load
    if load and (config.training.skip_train or holds_initial_weights(load)):
        config = check_weights_loadable(load, config)
    parallel.initialize(
        config.parallel.tensor_model_parallel_size,
        config.parallel.pipeline_model_parallel_size,
        config.model.seed,
        timeout_minutes=config.faults.distributed_timeout_minutes,
    )
    state, components = build_components(
        config, train_valid_test_datasets_provider, model_provider, forward_step_func
    )
    start_iteration = state.iteration
    skip_train, save = config.training.skip_train, config.checkpoint.save
    if _is_logging_rank() and not skip_train:
        print(_describe_run(components, config, start_iteration), flush=True)
    stop_reason = None
    if not skip_train:
        dynamic_loss_scale = config.model.fp16 and config.optimizer.loss_scale is None
        with RunGuard(config.faults, dynamic_loss_scale) as guard:
            stop_reason = train(state, components, guard, config)
    saved_by_interval = (
        config.checkpoint.save_interval and state.iteration % config.checkpoint.save_interval == 0
    )
    if save and state.iteration > start_iteration and not saved_by_interval:
        save_checkpoint(save, state, components, config)
    if stop_reason is not None:
        components.logger.close()
        saved = f"; saved iteration {state.iteration} to {save}" if save else " (no --save: nothing saved)"
        if guard.failed(state):
            raise TooManySkippedSteps(f"stopped at iteration {state.iteration}: {stop_reason}{saved}.")
        if _is_logging_rank():
            print(f"exiting at iteration {state.iteration}: {stop_reason}{saved}.", flush=True)
        return None
    final = evaluate(components, config)
    if final is not None:
        components.logger.log_eval(state.iteration, final, final=True)
    components.logger.close()
    return final if _is_logging_rank() else None
