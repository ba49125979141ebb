"""The training loop's one state object and one bundle of components.

As torchtitan's `Trainer` and lingua's `TrainState`: everything that changes from step to step
and is not a tensor of a module lives in `TrainState` (saved as one object in checkpoints);
everything the loop works with is built once by `pretrain()` into `TrainComponents`, so the
loop, evaluation and checkpointing take these two objects instead of long argument lists.

The Jacobi-draw counter of the interleaved layout is a buffer of the model (`jacobi_draws`), so
it travels with the weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class TrainState:
    """Progress of a run: the iteration reached, the training samples consumed so far
    (Megatron-LM's `consumed_train_samples`: the data position a resumed run continues from),
    the training FLOPs spent so far (`flops_meter.TrainingFlops`, on the logging rank) and the
    steps whose NaN/inf loss or grad norm applied no update (`training/faults.py`)."""

    iteration: int = 0
    consumed_train_samples: int = 0
    train_flops: float = 0.0
    skipped_steps_in_a_row: int = 0
    skipped_steps_total: int = 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state_dict: dict) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, state_dict[field.name])


@dataclasses.dataclass
class TrainComponents:
    """What the loop drives, built once per run.

    model_parts: the bare model, one module per pipeline chunk (what checkpoints and tools see;
        a list so virtual-pipeline chunks are just more parts).
    optimizer: the optimizer seam (`parallel/optimizer.py`): zero_grad / step -> grad norm /
        state_dict / load_state_dict, `param_groups` for the scheduler, and `schedule_parts`,
        the modules megatron-core's schedule runs (the parts themselves, or their data-parallel
        wrappers).
    scheduler: megatron-core's OptimizerParamScheduler over the optimizer's param groups.
    forward_step_func: (data_iterator, model) -> (output, loss_func), as in pretrain_gpt.py.
    train_iterator: micro-batches of this data-parallel rank, from the resumed data position.
    valid_dataset: the validation split (evaluation restarts at its beginning every time).
    logger: MetricsLogger (drops everything off the logging rank).
    """

    model_parts: list
    optimizer: Any
    scheduler: Any
    forward_step_func: Callable | None = None
    train_iterator: Any = None
    valid_dataset: Any = None
    logger: Any = None

    def parameter_count(self) -> int:
        """Parameters held by this rank (every pipeline chunk)."""
        return sum(p.numel() for part in self.model_parts for p in part.parameters())

    def train(self, mode: bool = True) -> None:
        for part in self.model_parts:
            part.train(mode)
