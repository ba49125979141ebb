"""Training checkpoints: layout-free weights, per-rank training state, atomic directories.

    <save>/iter_0000100/
        run.pt                                  the RunConfig (versioned), the flags and the
                                                iteration (global rank 0): what tools read
                                                before building anything
        model/                                  the weights, megatron-core `dist_checkpointing`
                                                (torch_dist): loads into a model of any TP/PP
        mp_rank_00[_PPP]/model_optim_rng.pt     one model-parallel rank's optimizer, LR schedule,
                                                RNG states and TrainState (iteration, data position,
                                                skipped-step counters): exact resume at this layout
        optimizer/                              --use-distributed-optimizer: every data-parallel
                                                rank's own shard of the optimizer state
                                                (dist_checkpointing, megatron-core's `dp_reshardable`)
        deepspeed/                              --deepspeed: the engine's own files, one ZeRO
                                                partition per rank; under ZeRO-3 they are the
                                                only copy of the weights (no `model/`)
    <save>/latest_checkpointed_iteration.txt    written last: "100"

A *weights-only* checkpoint (tools/convert_checkpoint.py reshard) has `run.pt` and either
`model/` (sharded) or `mp_rank_*/model_optim_rng.pt` files holding only `{"model": state_dict}`
of that layout (plain: readable with torch.load alone). It evaluates (`--skip-train`) and
exports, but does not resume training.

An iteration directory is written under a temporary name, every file is fsync'ed, and the
directory is renamed into place; the marker is then replaced atomically and `--keep-last`
prunes older iterations. Before the rename every rank says whether it wrote its part; when one
failed, the staged directory is deleted, the marker keeps naming the previous iteration and
every rank raises a CheckpointSaveError naming the first failing rank. A crash therefore leaves
either the previous checkpoint or the new one, never a half-written one behind the marker.
Files hold only tensors and plain Python values and are read with `torch.load(weights_only=True)`.

No rank ever holds more than its own shards while saving: the model's tensors are written by
the ranks that hold them; an optimizer seam with sharded state (the distributed optimizer, a
DeepSpeed engine) writes it with `save(dir)` / reads it with `load(dir)`. A ZeRO-3 engine's
weights are partitioned over the data-parallel ranks: its checkpoint keeps them only in
DeepSpeed's partitioned files, and `load_model_weights` consolidates them in one process
(DeepSpeed's `zero_to_fp32`) for evaluation, export and resharding.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel

from megatron_lcot import compat
from megatron_lcot.run_config import RunConfig

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
CHECKPOINT_FILENAME = "model_optim_rng.pt"
RUN_FILENAME = "run.pt"
MODEL_DIRNAME = "model"
DEEPSPEED_DIRNAME = "deepspeed"

# Flags that fix the parameters (their shapes, their dtype, or what they mean): weights saved
# under other values are another model.
MODEL_FLAGS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "padded_vocab_size",
    "latent_steps",
    "latent_layout",
    "halting",
    "init_method_std",
    "bf16",
)
# Flags that fix the LR/weight-decay schedule: megatron-core's scheduler cannot follow a change
# (its load_state_dict asserts on them).
SCHEDULE_FLAGS = ("lr", "min_lr", "lr_warmup_iters", "lr_decay_style", "train_iters", "weight_decay")
# The per-rank optimizer and RNG state belongs to one parallel layout.
LAYOUT_FLAGS = ("tensor_model_parallel_size", "pipeline_model_parallel_size")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this run; the message says which flag differs."""


class CheckpointSaveError(RuntimeError):
    """A rank failed to write its part of a checkpoint; the marker still names the previous one."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _rank_subdir() -> str:
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return f"mp_rank_{tp_rank:02d}"
    return f"mp_rank_{tp_rank:02d}_{parallel_state.get_pipeline_model_parallel_rank():03d}"


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The LcotGPTModel inside data-parallel wrappers (megatron DDP, DeepSpeed engine), whose
    `sharded_state_dict()` names the weights independently of the wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: str, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _numpy_rng_state() -> tuple:
    """numpy's global RNG state with its key array as a tensor (weights_only cannot read arrays)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return name, torch.from_numpy(keys.copy()), pos, has_gauss, cached_gaussian


def _rng_state() -> dict:
    return {
        "random": random.getstate(),
        "numpy": _numpy_rng_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "model_parallel_tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _restore_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["model_parallel_tracker"])


def plain_flags(config: RunConfig) -> dict:
    """The run's flags by name (`RunConfig.as_flags`) as plain values, what weights_only loading
    accepts: stored as `args` beside the RunConfig, so that checks compare flags by name and
    checkpoints stay readable by tools that read flags."""
    plain = (bool, int, float, str, type(None))
    return {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in vars(config.as_flags()).items()
        if isinstance(v, plain) or (isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v))
    }


def _as_parts(model) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _sharded_weights(model_parts: list) -> dict:
    """One entry per model part (pipeline chunk). dist_checkpointing stores each tensor under
    its global name (layer numbers offset by the stage), so any chunking loads it."""
    return {
        f"model{index}": unwrap_model(part).sharded_state_dict() for index, part in enumerate(model_parts)
    }


def save_model_weights(model, directory: str) -> None:
    """Write the weights of `model` (a module or the list of model parts) as a dist_checkpointing
    directory (collective; `directory` must exist and be empty). Every rank writes its own
    shards; a replicated tensor is written once, by its main replica."""
    compat.use_in_process_results_queue()
    dist_checkpointing.save(_sharded_weights(_as_parts(model)), directory)


def _prepare_staging(root: str, iteration: int) -> str:
    """An empty temporary iteration directory (rank 0 creates it; collective)."""
    staging_dir = os.path.join(root, f".tmp_iter_{iteration:07d}")
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(staging_dir, ignore_errors=True)  # left by a crash during an earlier save
        os.makedirs(os.path.join(staging_dir, MODEL_DIRNAME))
    dist.barrier()
    return staging_dir


def _agree_every_part_written(root: str, staging_dir: str, iteration: int, failure: str | None) -> None:
    """All ranks exchange whether they wrote their part (collective). When one failed, rank 0
    deletes the staged directory and every rank raises, naming the first failing rank: the
    marker is not moved."""
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    failed = [(rank, text) for rank, text in enumerate(failures) if text is not None]
    if not failed:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(staging_dir, ignore_errors=True)
    rank, text = failed[0]
    raise CheckpointSaveError(
        f"saving iteration {iteration} to {root!r} failed on rank {rank} ({text})"
        f"{f' and {len(failed) - 1} more rank(s)' if len(failed) > 1 else ''}; "
        f"{TRACKER_FILENAME} still names iteration {latest_iteration(root)}."
    )


def _written_by_every_rank(root: str, staging_dir: str, iteration: int, write) -> None:
    """Run this rank's `write()`, then agree with the others that every part was written."""
    failure = None
    try:
        write()
    except Exception as error:  # noqa: BLE001 - every rank must learn of it, or the others hang
        failure = f"{type(error).__name__}: {error}"
    _agree_every_part_written(root, staging_dir, iteration, failure)


def _publish(root: str, staging_dir: str, iteration: int, run_state: dict, keep_last: int | None) -> str:
    """Rename the staged directory into place, then move the marker (collective; after
    `_agree_every_part_written`)."""
    final_dir = iteration_dir(root, iteration)
    if dist.get_rank() == 0:
        _write_durably(os.path.join(staging_dir, RUN_FILENAME), lambda f: torch.save(run_state, f))
        for dirpath, _, _ in os.walk(staging_dir):
            _fsync_dir(dirpath)
        if os.path.exists(final_dir):  # saving the same iteration again replaces it
            shutil.rmtree(final_dir)
        os.rename(staging_dir, final_dir)
        tracker_tmp = os.path.join(root, f".{TRACKER_FILENAME}.tmp")
        _write_durably(tracker_tmp, lambda f: f.write(str(iteration).encode()))
        os.replace(tracker_tmp, os.path.join(root, TRACKER_FILENAME))
        _fsync_dir(root)
        if keep_last:
            prune_old_iterations(root, keep_last)
    dist.barrier()
    return final_dir


def _engine_of(config: RunConfig) -> str:
    """The optimizer seam a run trains with, as saved in `run.pt`: its per-rank state only
    resumes under the same one."""
    from megatron_lcot.parallel.deepspeed_config import run_zero_stage

    zero_stage = run_zero_stage(config.parallel)
    if zero_stage is not None:
        return f"deepspeed zero-{zero_stage}"
    return "megatron distributed-optimizer" if config.parallel.use_distributed_optimizer else "megatron ddp"


_ENGINE_FLAGS = {"deepspeed": "--deepspeed", "megatron": "no --deepspeed"}


def _check_same_engine(saved: str | None, config: RunConfig, root: str) -> None:
    """Refuse to resume the optimizer state of another seam, naming the flag and the command
    that converts the weights (the optimizer state of one seam does not map onto another's)."""
    now = _engine_of(config)
    if saved is None or saved == now:
        return
    if saved.split()[0] != now.split()[0]:
        flag = "--deepspeed"
    elif now.startswith("deepspeed"):
        flag = "--zero-stage (or zero_optimization.stage in --deepspeed_config)"
    else:
        flag = "--use-distributed-optimizer"
    raise CheckpointError(
        f"--load {root!r}: the checkpoint's optimizer state was saved by {saved} but this run trains with "
        f"{now} ({flag} differs); resume with the checkpoint's {flag}, or convert its weights and start a new "
        f"optimizer from them: tools/convert_checkpoint.py reshard --load {root} --save NEW_DIR --as-initial-weights, "
        "then --load NEW_DIR."
    )


def save_checkpoint(root: str, train_state, components, config: RunConfig) -> str:
    """Write `train_state.iteration` atomically and point the marker at it (collective call).

    components: the TrainComponents whose model parts, optimizer and scheduler are saved. The
    optimizer seam either returns its state from `state_dict()` (kept in the per-rank file)
    or, when its state is sharded over ranks (`saves_own_files`: distributed optimizer,
    DeepSpeed), writes its own files with `save(directory)`. A seam that `partitions_weights`
    (ZeRO-3) keeps the only copy of the weights in those files.
    """
    iteration, optimizer = train_state.iteration, components.optimizer
    staging_dir = _prepare_staging(root, iteration)
    optimizer.sync_params()  # weights still being gathered (overlapped parameter gathering)
    own_files = optimizer.save if optimizer.saves_own_files else None

    def write() -> None:
        if not optimizer.partitions_weights:
            save_model_weights(components.model_parts, os.path.join(staging_dir, MODEL_DIRNAME))
        elif dist.get_rank() == 0:  # ZeRO-3: the weights live in the engine's partitions only
            os.rmdir(os.path.join(staging_dir, MODEL_DIRNAME))
        if own_files is not None:
            own_files(staging_dir)
        if parallel_state.get_data_parallel_rank() == 0:
            state = {
                "optimizer": None if own_files is not None else optimizer.state_dict(),
                "opt_param_scheduler": components.scheduler.state_dict(),
                "train_state": train_state.state_dict(),
                "rng_state": _rng_state(),
                "args": plain_flags(config),
            }
            rank_dir = os.path.join(staging_dir, _rank_subdir())
            os.makedirs(rank_dir, exist_ok=True)
            _write_durably(os.path.join(rank_dir, CHECKPOINT_FILENAME), lambda f: torch.save(state, f))

    _written_by_every_rank(root, staging_dir, iteration, write)
    run_state = {
        "iteration": iteration,
        "args": plain_flags(config),
        "weights_only": False,
        "engine": _engine_of(config),
        "run_config": config.to_dict(),
    }
    return _publish(root, staging_dir, iteration, run_state, config.checkpoint.keep_last)


def save_weights_only(root: str, iteration: int, model, config: RunConfig, sharded: bool) -> str:
    """A weights-only checkpoint of `model` (one part; built with `config`'s layout) at `iteration`:
    dist_checkpointing (`sharded`, any layout loads it) or one plain torch file per
    model-parallel rank. Collective; what tools/convert_checkpoint.py reshard writes."""
    staging_dir = _prepare_staging(root, iteration)

    def write() -> None:
        if sharded:
            save_model_weights(model, os.path.join(staging_dir, MODEL_DIRNAME))
            return
        if dist.get_rank() == 0:
            os.rmdir(os.path.join(staging_dir, MODEL_DIRNAME))
        if parallel_state.get_data_parallel_rank() == 0:
            rank_dir = os.path.join(staging_dir, _rank_subdir())
            os.makedirs(rank_dir, exist_ok=True)
            weights = {"model": unwrap_model(model).state_dict(), "args": plain_flags(config)}
            _write_durably(os.path.join(rank_dir, CHECKPOINT_FILENAME), lambda f: torch.save(weights, f))

    _written_by_every_rank(root, staging_dir, iteration, write)
    run_state = {
        "iteration": iteration,
        "args": plain_flags(config),
        "weights_only": True,
        "run_config": config.to_dict(),
    }
    return _publish(root, staging_dir, iteration, run_state, None)


def prune_old_iterations(root: str, keep_last: int) -> list:
    """Delete all but the `keep_last` newest iteration directories, never the one the marker
    names; returns the deleted iterations."""
    iterations = sorted(
        int(m.group(1)) for name in os.listdir(root) if (m := re.fullmatch(r"iter_(\d{7})", name))
    )
    keep = set(iterations[-keep_last:]) | {latest_iteration(root)}
    deleted = [it for it in iterations if it not in keep]
    for iteration in deleted:
        shutil.rmtree(iteration_dir(root, iteration))
    return deleted


def latest_iteration(root: str) -> int | None:
    """The iteration named by the marker in `root`, or None when there is no checkpoint."""
    tracker = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(tracker):
        return None
    with open(tracker) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise CheckpointError(f"--load {root!r}: {TRACKER_FILENAME} holds {text!r}, not an iteration number.")
    return int(text)


def _resolve_iteration(root: str, iteration: int | None) -> int:
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise CheckpointError(
                f"--load {root!r}: no {TRACKER_FILENAME} there; pass a directory written "
                "by pretrain_lcot.py --save (or tools/convert_checkpoint.py)."
            )
    if not os.path.isdir(iteration_dir(root, iteration)):
        raise CheckpointError(
            f"--load {root!r}: iteration {iteration} has no directory "
            f"{iteration_dir(root, iteration)}; restore it, pick another iteration, "
            "or point the marker at an existing iteration."
        )
    return iteration


def _rank_file(root: str, iteration: int) -> str:
    path = os.path.join(iteration_dir(root, iteration), _rank_subdir(), CHECKPOINT_FILENAME)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"--load {root!r}: iteration {iteration} has no {path}; restore that file, "
            "or load with the parallel layout the checkpoint was saved with."
        )
    return path


def _run_state(root: str, iteration: int) -> dict:
    return torch.load(
        os.path.join(iteration_dir(root, iteration), RUN_FILENAME), map_location="cpu", weights_only=True
    )


def saved_args(root: str, iteration: int | None = None) -> dict:
    """The flags a checkpoint was trained with (plain values by flag name), read without
    building anything and whatever its layout: what the compatibility checks compare (tools
    read the typed `load_run_config`)."""
    return _run_state(root, _resolve_iteration(root, iteration))["args"]


def load_run_config(root: str, iteration: int | None = None) -> RunConfig:
    """The RunConfig a checkpoint was written with, read without building anything. Checkpoints
    written before the RunConfig existed stored only the flags (`args`): the same by-name
    reading of those flags gives the RunConfig they describe."""
    run_state = _run_state(root, _resolve_iteration(root, iteration))
    if "run_config" in run_state:
        return RunConfig.from_dict(run_state["run_config"])
    return RunConfig.from_values(run_state["args"])


def check_compatible(saved: dict, config: RunConfig, flags: tuple, root: str) -> None:
    """Raise a CheckpointError naming the first of `flags` whose value differs from `saved` (the
    checkpoint's flags by name)."""
    current = config.as_flags()
    for flag in flags:
        before, now = saved.get(flag), getattr(current, flag, None)
        if before != now:
            name = "--" + flag.replace("_", "-")
            hint = (
                "resume at the checkpoint's layout (its weights alone load at any layout: "
                "--skip-train, tools/convert_checkpoint.py reshard)"
                if flag in LAYOUT_FLAGS
                else "pass the checkpoint's value or use another --load"
            )
            raise CheckpointError(
                f"--load {root!r}: the checkpoint was trained with {name} {before} but this "
                f"run has {name} {now}; {hint}."
            )


def check_weights_loadable(root: str, config: RunConfig) -> RunConfig:
    """Before building a model to receive `root`'s weights at this run's layout (--skip-train,
    initial weights): `config` with the checkpoint's vocabulary padding (it depends on the TP it
    was saved at) when this TP divides it; raises if any other model flag differs."""
    saved = saved_args(root)
    padded = saved.get("padded_vocab_size")
    if padded and padded % config.parallel.tensor_model_parallel_size == 0:
        config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, padded_vocab_size=padded)
        )
    check_compatible(saved, config, MODEL_FLAGS, root)
    return config


def load_model_weights(root: str, model, iteration: int | None = None) -> int:
    """Load only the model weights of a checkpoint into `model` (a module, or the list of model
    parts; built with the checkpoint's model flags, at any tensor/pipeline layout when the
    weights are sharded); returns the iteration. Collective over all ranks. The seam for
    evaluation, export and generation: they never see the optimizer or the file layout."""
    iteration = _resolve_iteration(root, iteration)
    parts = [unwrap_model(part) for part in _as_parts(model)]
    model_dir = os.path.join(iteration_dir(root, iteration), MODEL_DIRNAME)
    if os.path.isdir(model_dir):
        loaded = dist_checkpointing.load(_sharded_weights(parts), model_dir)
        for index, part in enumerate(parts):
            part.load_state_dict(loaded[f"model{index}"])
    elif os.path.isdir(os.path.join(iteration_dir(root, iteration), DEEPSPEED_DIRNAME)):
        _load_consolidated_zero_weights(root, iteration, parts)
    elif len(parts) == 1:
        state = torch.load(_rank_file(root, iteration), map_location="cpu", weights_only=True)
        parts[0].load_state_dict(state["model"])
    else:
        raise CheckpointError(
            f"--load {root!r}: iteration {iteration} holds plain weights of one model part; "
            "reshard it to the sharded format (tools/convert_checkpoint.py reshard) first."
        )
    return iteration


def _load_consolidated_zero_weights(root: str, iteration: int, parts: list) -> None:
    """A ZeRO-3 checkpoint keeps its weights only as the ranks' fp32 partitions: consolidate
    them here (DeepSpeed's `zero_to_fp32`, in this process's memory) into a model built at
    TP = PP = 1. The rounding to the model's dtype is the one the engine applied in training."""
    if len(parts) != 1 or parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise CheckpointError(
            f"--load {root!r}: iteration {iteration} holds ZeRO-3-partitioned weights, which "
            "load into one process (TP = PP = 1); reshard them to the sharded format "
            "(tools/convert_checkpoint.py reshard, one process) to load them at another layout."
        )
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    consolidated = get_fp32_state_dict_from_zero_checkpoint(
        iteration_dir(root, iteration), tag=DEEPSPEED_DIRNAME
    )
    missing, unexpected = parts[0].load_state_dict(consolidated, strict=False)
    missing = [name for name in missing if not name.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(
            f"--load {root!r}: the ZeRO-3 weights of iteration {iteration} do not match this "
            f"model (missing {missing[:3]}, unexpected {unexpected[:3]}); build it with the "
            "checkpoint's model flags."
        )


def holds_initial_weights(root: str) -> bool:
    """Whether `root`'s latest checkpoint is a weights-only iteration 0: a starting point such as
    `tools/convert_checkpoint.py from-hf` writes. Training loads it as its initial weights (before
    the optimizer copies them) and starts at iteration 0 with a fresh optimizer and schedule."""
    iteration = latest_iteration(root)
    return iteration == 0 and _run_state(root, 0)["weights_only"]


def check_resumable(root: str, config: RunConfig) -> None:
    """Before anything is built: raise a CheckpointError when `root`'s latest checkpoint is one
    this run would refuse to resume (another model, schedule, layout or optimizer seam)."""
    iteration = latest_iteration(root)
    if iteration is None:
        return
    run_state = _run_state(root, _resolve_iteration(root, iteration))
    if not run_state["weights_only"]:
        check_compatible(run_state["args"], config, MODEL_FLAGS + SCHEDULE_FLAGS + LAYOUT_FLAGS, root)
        _check_same_engine(run_state.get("engine"), config, root)


def load_checkpoint(root: str, components, config: RunConfig, train_state):
    """Restore the latest checkpoint in `root` into the components' model parts, optimizer,
    scheduler and the RNGs, and the saved TrainState into `train_state` (a fresh one, which
    the training loop owns); returns it.

    `train_state` is returned unchanged when `root` holds no checkpoint yet, so
    `--save D --load D` starts fresh the first time and resumes afterwards. Raises
    CheckpointError, before touching anything, when a flag that fixes the model, the schedule
    or the layout differs.
    """
    if latest_iteration(root) is None:
        return train_state
    iteration = _resolve_iteration(root, None)
    run_state = _run_state(root, iteration)
    if run_state["weights_only"] and iteration == 0:  # a starting point: build_components loaded it
        check_compatible(run_state["args"], config, MODEL_FLAGS, root)
        return train_state
    if run_state["weights_only"]:
        raise CheckpointError(
            f"--load {root!r}: iteration {iteration} holds weights only (written by "
            "tools/convert_checkpoint.py reshard); evaluate it with --skip-train, or resume "
            "from a checkpoint written by pretrain_lcot.py --save."
        )
    check_compatible(run_state["args"], config, MODEL_FLAGS + SCHEDULE_FLAGS + LAYOUT_FLAGS, root)
    _check_same_engine(run_state.get("engine"), config, root)
    state = torch.load(_rank_file(root, iteration), map_location="cpu", weights_only=True)
    optimizer = components.optimizer
    if not optimizer.load_restores_weights:
        load_model_weights(root, components.model_parts, iteration)
    if optimizer.saves_own_files:  # sharded optimizer state (a DeepSpeed engine also restores the weights)
        optimizer.load(iteration_dir(root, iteration))
    else:
        optimizer.load_state_dict(state["optimizer"])
    components.scheduler.load_state_dict(state["opt_param_scheduler"])
    _restore_rng_state(state["rng_state"])
    train_state.load_state_dict(state["train_state"])
    return train_state
