"""Stops and faults that every rank must agree on, checked once per training step.

Megatron-LM's flags:
    --exit-signal-handler        SIGTERM or SIGUSR1: finish the current step, save, exit 0
    --exit-duration-in-mins M    the same once the process has run for M minutes (counted from
                                 the process's start, as Megatron-LM does: start-up and
                                 checkpoint loading count, so M can be the job's time limit
                                 less the time a save takes)
    --exit-interval N            the same at every iteration divisible by N
and ours:
    --max-skipped-steps-in-a-row N   a step whose loss or grad norm is NaN/inf applies no update
                                     and is counted; after N such steps in a row the run saves
                                     and stops with an error

When a rank fails, the others meet it as a failed collective ("connection closed", a timeout),
which says nothing of the cause. The failing rank therefore records "rank R: its error" in the
process group's key-value store (the rendezvous store every rank can read, held outside the
failing process's collectives), first writer wins; a rank whose collective failed reads it
and names that rank and error (`record_first_failure`, `describe_collective_failure`).

A signal reaches one process (a scheduler may signal only some), and wall clocks differ, so
the ranks agree through one all-reduce (MAX over the whole world, on `parallel.device()`) of
[loss is not finite, a signal was received, the duration is exceeded] after each step's
forward/backward and before its update: every rank then skips the same updates and stops after
the same iteration. The loss is only known on the last pipeline stage; the all-reduce also
carries it to the others.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import signal
import time

import psutil
import torch
import torch.distributed as dist

from megatron_lcot import compat, parallel
from megatron_lcot.run_config import FaultsSection
from megatron_lcot.training.state import TrainState

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
FIRST_FAILURE_KEY = "megatron_lcot/first_failure"
# How long a rank whose collective failed waits for the failing rank's record: the failing rank
# writes it while the others already see their collective fail.
FIRST_FAILURE_WAIT = datetime.timedelta(seconds=10)


def _failure_store():
    """The default process group's store, or None before init / when it cannot be reached."""
    if not dist.is_initialized():
        return None
    return compat.default_store()


def record_first_failure(error: BaseException) -> None:
    """Record this rank's error as the run's first failure unless another rank recorded one."""
    store = _failure_store()
    if store is None:
        return
    text = str(error).strip().splitlines()
    text = f"rank {dist.get_rank()}: {type(error).__name__}: {text[0] if text else ''}"
    try:
        store.compare_set(FIRST_FAILURE_KEY, "", text)
    except (RuntimeError, dist.DistError):  # the store's host is gone too: nothing to tell
        pass


def first_failure(wait: datetime.timedelta = FIRST_FAILURE_WAIT) -> str | None:
    """The first failure a rank recorded ("rank R: Type: message"), waiting up to `wait` for it;
    None when no rank recorded one (a rank was killed or froze) or the store is gone."""
    store = _failure_store()
    if store is None:
        return None
    try:
        store.wait([FIRST_FAILURE_KEY], wait)
        return store.get(FIRST_FAILURE_KEY).decode()
    except (RuntimeError, dist.DistError):
        return None


def describe_collective_failure(error: BaseException) -> str:
    """What a rank whose collective failed reports: itself, the first failing rank and its error."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    cause = first_failure()
    cause = (
        f"the first rank to fail was {cause}"
        if cause is not None
        else "no rank recorded an error: one was killed (e.g. out of memory), froze, or lost its network"
    )
    return (
        f"rank {os.environ.get('RANK', dist.get_rank() if dist.is_initialized() else 0)}: a collective with "
        f"the other ranks failed; {cause} (this rank saw: {first_line}; collectives time out after "
        "--distributed-timeout-minutes)"
    )


class TooManySkippedSteps(RuntimeError):
    """`--max-skipped-steps-in-a-row` consecutive steps had a non-finite loss or grad norm."""


@dataclasses.dataclass
class StepVerdict:
    """What all ranks agreed on for one step."""

    loss_is_finite: bool
    signal_received: bool
    duration_exceeded: bool


class RunGuard:
    """Owns the exit-signal handler and the run clock; counts skipped steps in the TrainState.

    Use as a context manager around the training loop (the signal handler is installed only
    inside it), call `agree()` once per step before the update, `record_update()` after it, and
    `stop_reason()` at the end of the step.
    """

    def __init__(self, faults: FaultsSection, dynamic_loss_scale: bool = False) -> None:
        self.exit_signal_handler = faults.exit_signal_handler
        self.exit_duration_in_mins = faults.exit_duration_in_mins
        self.exit_interval = faults.exit_interval
        # Under --fp16 with dynamic loss scaling, overflow steps are the scaler's business (it
        # halves the scale: from 2^32 that takes many skipped steps in a row): counted, never a stop.
        self.max_skipped_in_a_row = 0 if dynamic_loss_scale else faults.max_skipped_steps_in_a_row
        self.received_signal: int | None = None
        self._previous_handlers: dict = {}
        self._process_start = psutil.Process().create_time()  # seconds since the epoch

    def __enter__(self) -> RunGuard:
        if self.exit_signal_handler:
            for signum in EXIT_SIGNALS:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _on_signal(self, signum, frame) -> None:
        self.received_signal = signum

    def agree(self, loss: float | None) -> StepVerdict:
        """All-reduce this rank's view of the step (collective; `loss` is None off the last
        pipeline stage)."""
        minutes = (time.time() - self._process_start) / 60
        flags = torch.tensor(
            [
                loss is not None and not math.isfinite(loss),
                self.received_signal is not None,
                self.exit_duration_in_mins is not None and minutes >= self.exit_duration_in_mins,
            ],
            dtype=torch.int32,
            device=parallel.device(),
        )
        parallel.all_reduce(flags, op=dist.ReduceOp.MAX)
        loss_not_finite, signal_received, duration_exceeded = (bool(flag) for flag in flags.tolist())
        return StepVerdict(not loss_not_finite, signal_received, duration_exceeded)

    @staticmethod
    def record_update(state: TrainState, applied: bool) -> None:
        if applied:
            state.skipped_steps_in_a_row = 0
        else:
            state.skipped_steps_in_a_row += 1
            state.skipped_steps_total += 1

    def stop_reason(self, state: TrainState, verdict: StepVerdict) -> str | None:
        """Why the run stops after this step (None: it goes on). The same on every rank."""
        if self.failed(state):
            return (
                f"{state.skipped_steps_in_a_row} steps in a row had a non-finite loss or grad norm "
                f"(--max-skipped-steps-in-a-row {self.max_skipped_in_a_row}); lower --lr, raise "
                "--lr-warmup-iters or --clip-grad, or resume from an earlier checkpoint"
            )
        if verdict.signal_received:
            return "an exit signal (SIGTERM or SIGUSR1) reached a rank (--exit-signal-handler)"
        if verdict.duration_exceeded:
            return f"the process ran for --exit-duration-in-mins {self.exit_duration_in_mins}"
        if self.exit_interval and state.iteration % self.exit_interval == 0:
            return f"iteration {state.iteration} is a multiple of --exit-interval {self.exit_interval}"
        return None

    def failed(self, state: TrainState) -> bool:
        """Whether the run must stop with an error (too many skipped steps in a row)."""
        return bool(self.max_skipped_in_a_row) and state.skipped_steps_in_a_row >= self.max_skipped_in_a_row
