"""Training checkpoints: layout-free weights, per-rank training state, atomic directories.

    <save>/iter_0000100/
        run.pt                                  the flags and the iteration (global rank 0): what
                                                tools read before building anything
        model/                                  the weights, megatron-core `dist_checkpointing`
                                                (torch_dist): loads into a model of any TP/PP
        mp_rank_00[_PPP]/model_optim_rng.pt     one model-parallel rank's optimizer, LR schedule,
                                                RNG states and TrainState (iteration, data position,
                                                skipped-step counters): exact resume at this layout
    <save>/latest_checkpointed_iteration.txt    written last: "100"

A *weights-only* checkpoint (tools/convert_checkpoint.py reshard) has `run.pt` and either
`model/` (sharded) or `mp_rank_*/model_optim_rng.pt` files holding only `{"model": state_dict}`
of that layout (plain: readable with torch.load alone). It evaluates (`--skip-train`) and
exports, but does not resume training.

An iteration directory is written under a temporary name, every file is fsync'ed, and the
directory is renamed into place; the marker is then replaced atomically and `--keep-last`
prunes older iterations. A crash therefore leaves either the previous checkpoint or the new
one, never a half-written one behind the marker. Files hold only tensors and plain Python
values and are read with `torch.load(weights_only=True)`. A DeepSpeed engine behind the
optimizer seam writes its own ZeRO-partitioned files into the iteration directory
(`save(dir)` / `load(dir)`).
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.strategies import filesystem_async

from megatron_lcot.training.state import TrainState

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
CHECKPOINT_FILENAME = "model_optim_rng.pt"
RUN_FILENAME = "run.pt"
MODEL_DIRNAME = "model"

# Flags that fix the parameters (their shapes, their dtype, or what they mean): weights saved
# under other values are another model.
MODEL_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
               "padded_vocab_size", "latent_steps", "latent_layout", "halting", "init_method_std", "bf16")
# Flags that fix the LR/weight-decay schedule: megatron-core's scheduler cannot follow a change
# (its load_state_dict asserts on them).
SCHEDULE_FLAGS = ("lr", "min_lr", "lr_warmup_iters", "lr_decay_style", "train_iters", "weight_decay")
# The per-rank optimizer and RNG state belongs to one parallel layout.
LAYOUT_FLAGS = ("tensor_model_parallel_size", "pipeline_model_parallel_size")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this run; the message says which flag differs."""


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


def plain_args(args) -> dict:
    """The flags as plain values (what weights_only loading accepts)."""
    plain = (bool, int, float, str, type(None))
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
            if isinstance(v, plain) or (isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v))}


def _use_in_process_results_queue() -> None:
    """dist_checkpointing's torch_dist writer collects its (forked) writers' results through a
    queue that by default lives in a *spawned* multiprocessing Manager: a fresh interpreter
    that re-imports `__main__` (13 s per process here, and a crash for scripts without a
    `__main__` guard). Saving is synchronous: the results are put and read by this process,
    so a thread queue serves (a multiprocessing one could still be empty when read)."""
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def _as_parts(model) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _sharded_weights(model_parts: list) -> dict:
    """One entry per model part (pipeline chunk). dist_checkpointing stores each tensor under
    its global name (layer numbers offset by the stage), so any chunking loads it."""
    return {f"model{index}": unwrap_model(part).sharded_state_dict() for index, part in enumerate(model_parts)}


def _gathered_zero3_parameters(model_parts: list):
    """DeepSpeed ZeRO-3 partitions every parameter over the data-parallel ranks (it marks them
    with `ds_id`): gather them while their full values are read (collective)."""
    partitioned = [p for part in model_parts for p in part.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def save_model_weights(model, directory: str) -> None:
    """Write the weights of `model` (a module or the list of model parts) as a dist_checkpointing
    directory (collective; `directory` must exist and be empty). Every rank contributes its
    shards; replicated tensors are written once."""
    _use_in_process_results_queue()
    parts = _as_parts(model)
    with _gathered_zero3_parameters(parts):
        dist_checkpointing.save(_sharded_weights(parts), directory)


def _prepare_staging(root: str, iteration: int) -> str:
    """An empty temporary iteration directory (rank 0 creates it; collective)."""
    staging_dir = os.path.join(root, f".tmp_iter_{iteration:07d}")
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(staging_dir, ignore_errors=True)  # left by a crash during an earlier save
        os.makedirs(os.path.join(staging_dir, MODEL_DIRNAME))
    dist.barrier()
    return staging_dir


def _publish(root: str, staging_dir: str, iteration: int, run_state: dict, keep_last: int | None) -> str:
    """Rename the staged directory into place, then move the marker (collective)."""
    final_dir = iteration_dir(root, iteration)
    dist.barrier()
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


def save_checkpoint(root: str, train_state: TrainState, components, args) -> str:
    """Write `train_state.iteration` atomically and point the marker at it (collective call).

    components: the TrainComponents whose model parts, optimizer and scheduler are saved. The
    optimizer seam either returns its state from `state_dict()` (kept in the per-rank file)
    or, as a DeepSpeed engine does, writes its own partitioned files with `save(directory)`.
    """
    iteration, optimizer = train_state.iteration, components.optimizer
    staging_dir = _prepare_staging(root, iteration)
    getattr(optimizer, "sync_params", lambda: None)()  # weights still being gathered (overlap)
    save_model_weights(components.model_parts, os.path.join(staging_dir, MODEL_DIRNAME))
    own_files = getattr(optimizer, "save", None)
    if own_files is not None:  # DeepSpeed: every rank writes its ZeRO partition (under deepspeed/)
        own_files(staging_dir)
    # Every rank asks: a distributed optimizer gathers its shards onto data-parallel rank 0.
    optimizer_state = None if own_files is not None else optimizer.state_dict()
    if parallel_state.get_data_parallel_rank() == 0:
        state = {
            "optimizer": optimizer_state,
            "opt_param_scheduler": components.scheduler.state_dict(),
            "train_state": train_state.state_dict(),
            "rng_state": _rng_state(),
            "args": plain_args(args),
        }
        rank_dir = os.path.join(staging_dir, _rank_subdir())
        os.makedirs(rank_dir, exist_ok=True)
        _write_durably(os.path.join(rank_dir, CHECKPOINT_FILENAME), lambda f: torch.save(state, f))
    run_state = {"iteration": iteration, "args": plain_args(args), "weights_only": False}
    return _publish(root, staging_dir, iteration, run_state, getattr(args, "keep_last", None))


def save_weights_only(root: str, iteration: int, model, args, sharded: bool) -> str:
    """A weights-only checkpoint of `model` (one part; built with `args`' layout) at `iteration`:
    dist_checkpointing (`sharded`, any layout loads it) or one plain torch file per
    model-parallel rank. Collective; what tools/convert_checkpoint.py reshard writes."""
    staging_dir = _prepare_staging(root, iteration)
    if sharded:
        save_model_weights(model, os.path.join(staging_dir, MODEL_DIRNAME))
    else:
        if dist.get_rank() == 0:
            os.rmdir(os.path.join(staging_dir, MODEL_DIRNAME))
        if parallel_state.get_data_parallel_rank() == 0:
            rank_dir = os.path.join(staging_dir, _rank_subdir())
            os.makedirs(rank_dir, exist_ok=True)
            weights = {"model": unwrap_model(model).state_dict(), "args": plain_args(args)}
            _write_durably(os.path.join(rank_dir, CHECKPOINT_FILENAME), lambda f: torch.save(weights, f))
    run_state = {"iteration": iteration, "args": plain_args(args), "weights_only": True}
    return _publish(root, staging_dir, iteration, run_state, None)


def prune_old_iterations(root: str, keep_last: int) -> list:
    """Delete all but the `keep_last` newest iteration directories, never the one the marker
    names; returns the deleted iterations."""
    iterations = sorted(int(m.group(1)) for name in os.listdir(root)
                        if (m := re.fullmatch(r"iter_(\d{7})", name)))
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
            raise CheckpointError(f"--load {root!r}: no {TRACKER_FILENAME} there; pass a directory written "
                                  "by pretrain_lcot.py --save (or tools/convert_checkpoint.py).")
    if not os.path.isdir(iteration_dir(root, iteration)):
        raise CheckpointError(f"--load {root!r}: iteration {iteration} has no directory "
                              f"{iteration_dir(root, iteration)}; restore it, pick another iteration, "
                              "or point the marker at an existing iteration.")
    return iteration


def _rank_file(root: str, iteration: int) -> str:
    path = os.path.join(iteration_dir(root, iteration), _rank_subdir(), CHECKPOINT_FILENAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"--load {root!r}: iteration {iteration} has no {path}; restore that file, "
                              "or load with the parallel layout the checkpoint was saved with.")
    return path


def _run_state(root: str, iteration: int) -> dict:
    return torch.load(os.path.join(iteration_dir(root, iteration), RUN_FILENAME), map_location="cpu",
                      weights_only=True)


def saved_args(root: str, iteration: int | None = None) -> dict:
    """The flags a checkpoint was trained with (plain values), read without building anything
    and whatever its layout: tools rebuild the model from these
    (`argparse.Namespace(**saved_args(root))`)."""
    return _run_state(root, _resolve_iteration(root, iteration))["args"]


def check_compatible(saved: dict, args, flags: tuple, root: str) -> None:
    """Raise a CheckpointError naming the first of `flags` whose value differs from `saved`."""
    for flag in flags:
        before, now = saved.get(flag), getattr(args, flag, None)
        if before != now:
            name = "--" + flag.replace("_", "-")
            hint = ("resume at the checkpoint's layout (its weights alone load at any layout: "
                    "--skip-train, tools/convert_checkpoint.py reshard)" if flag in LAYOUT_FLAGS
                    else "pass the checkpoint's value or use another --load")
            raise CheckpointError(f"--load {root!r}: the checkpoint was trained with {name} {before} but this "
                                  f"run has {name} {now}; {hint}.")


def check_weights_loadable(root: str, args) -> None:
    """Before building a model to receive `root`'s weights at this run's layout (--skip-train):
    take over the checkpoint's vocabulary padding (it depends on the TP it was saved at) when
    this TP divides it, then refuse any other model flag that differs."""
    saved = saved_args(root)
    if saved.get("padded_vocab_size") and saved["padded_vocab_size"] % args.tensor_model_parallel_size == 0:
        args.padded_vocab_size = saved["padded_vocab_size"]
    check_compatible(saved, args, MODEL_FLAGS, root)


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
    elif len(parts) == 1:
        state = torch.load(_rank_file(root, iteration), map_location="cpu", weights_only=True)
        parts[0].load_state_dict(state["model"])
    else:
        raise CheckpointError(f"--load {root!r}: iteration {iteration} holds plain weights of one model part; "
                              "reshard it to the sharded format (tools/convert_checkpoint.py reshard) first.")
    return iteration


def holds_initial_weights(root: str) -> bool:
    """Whether `root`'s latest checkpoint is a weights-only iteration 0: a starting point such as
    `tools/convert_checkpoint.py from-hf` writes. Training loads it as its initial weights (before
    the optimizer copies them) and starts at iteration 0 with a fresh optimizer and schedule."""
    iteration = latest_iteration(root)
    return iteration == 0 and _run_state(root, 0)["weights_only"]


def load_checkpoint(root: str, components, args) -> TrainState:
    """Restore the latest checkpoint in `root` into the components' model parts, optimizer,
    scheduler and the RNGs; returns the run's TrainState.

    A fresh TrainState when `root` holds no checkpoint yet, so `--save D --load D` starts
    fresh the first time and resumes afterwards. Raises CheckpointError, before touching
    anything, when a flag that fixes the model, the schedule or the layout differs.
    """
    train_state = TrainState()
    if latest_iteration(root) is None:
        return train_state
    iteration = _resolve_iteration(root, None)
    run_state = _run_state(root, iteration)
    if run_state["weights_only"] and iteration == 0:  # a starting point: build_components loaded it
        check_compatible(run_state["args"], args, MODEL_FLAGS, root)
        return train_state
    if run_state["weights_only"]:
        raise CheckpointError(f"--load {root!r}: iteration {iteration} holds weights only (written by "
                              "tools/convert_checkpoint.py reshard); evaluate it with --skip-train, or resume "
                              "from a checkpoint written by pretrain_lcot.py --save.")
    check_compatible(run_state["args"], args, MODEL_FLAGS + SCHEDULE_FLAGS + LAYOUT_FLAGS, root)
    state = torch.load(_rank_file(root, iteration), map_location="cpu", weights_only=True)
    own_files = getattr(components.optimizer, "load", None)
    if own_files is not None:  # a DeepSpeed engine restores its (possibly ZeRO-3-partitioned) weights too
        own_files(iteration_dir(root, iteration))
    else:
        load_model_weights(root, components.model_parts, iteration)
        components.optimizer.load_state_dict(state["optimizer"])
    components.scheduler.load_state_dict(state["opt_param_scheduler"])
    _restore_rng_state(state["rng_state"])
    train_state.load_state_dict(state["train_state"])
    return train_state
