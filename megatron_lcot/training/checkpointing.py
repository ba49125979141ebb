"""Training checkpoints: atomic directories, Megatron-LM's layout and `latest` marker.

    <save>/iter_0000100/mp_rank_00/model_optim_rng.pt        (one file per model-parallel rank;
    <save>/iter_0000100/mp_rank_00_001/model_optim_rng.pt     the _PPP suffix only when PP > 1)
    <save>/latest_checkpointed_iteration.txt                 written last: "100"

An iteration directory is written under a temporary name, every file is fsync'ed, and the
directory is renamed into place; the marker is then replaced atomically. A crash therefore
leaves either the previous checkpoint or the new one, never a half-written one behind the
marker. Files hold only tensors and plain Python values and are read with
`torch.load(weights_only=True)`.

Each file holds the model shard, optimizer and LR-scheduler state, iteration, consumed
samples, every RNG state, and the flags: enough to resume a run exactly.
"""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_lcot.training.state import TrainState

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
CHECKPOINT_FILENAME = "model_optim_rng.pt"
# Flags whose values fix the parameter shapes: a checkpoint only loads under the same ones.
SHAPE_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
               "padded_vocab_size", "latent_steps", "halting", "tensor_model_parallel_size",
               "pipeline_model_parallel_size")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this run; the message says which flag differs."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _rank_subdir() -> str:
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return f"mp_rank_{tp_rank:02d}"
    return f"mp_rank_{tp_rank:02d}_{parallel_state.get_pipeline_model_parallel_rank():03d}"


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


def _plain_args(args) -> dict:
    """The flags as plain values (what weights_only loading accepts)."""
    plain = (bool, int, float, str, type(None))
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
            if isinstance(v, plain) or (isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v))}


def _model_state(components) -> dict:
    """Megatron-LM's keys: "model" for one part, "model0", "model1", ... for pipeline chunks."""
    parts = components.model_parts
    if len(parts) == 1:
        return {"model": parts[0].state_dict()}
    return {f"model{index}": part.state_dict() for index, part in enumerate(parts)}


def _load_model_state(components, state: dict) -> None:
    parts = components.model_parts
    keys = ["model"] if len(parts) == 1 else [f"model{index}" for index in range(len(parts))]
    for part, key in zip(parts, keys, strict=True):
        part.load_state_dict(state[key])


def save_checkpoint(root: str, train_state, components, args) -> str:
    """Write `train_state.iteration` atomically and point the marker at it (collective call).
    components: the TrainComponents whose model parts, optimizer and scheduler are saved."""
    iteration = train_state.iteration
    final_dir = iteration_dir(root, iteration)
    staging_dir = os.path.join(root, f".tmp_iter_{iteration:07d}")
    is_writer_of_dir = dist.get_rank() == 0
    if is_writer_of_dir:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(staging_dir, ignore_errors=True)  # left by a crash during an earlier save
        os.makedirs(staging_dir)
    dist.barrier()
    optimizer_state = components.optimizer.state_dict()  # collective under a sharded optimizer
    if hasattr(components.optimizer, "save"):  # DeepSpeed: every rank writes its ZeRO partition
        components.optimizer.save(staging_dir)
    if parallel_state.get_data_parallel_rank() == 0:
        state = {
            **_model_state(components),
            "optimizer": optimizer_state,
            "opt_param_scheduler": components.scheduler.state_dict(),
            **train_state.state_dict(),
            "rng_state": _rng_state(),
            "args": _plain_args(args),
        }
        rank_dir = os.path.join(staging_dir, _rank_subdir())
        os.makedirs(rank_dir, exist_ok=True)
        _write_durably(os.path.join(rank_dir, CHECKPOINT_FILENAME), lambda f: torch.save(state, f))
        _fsync_dir(rank_dir)
    dist.barrier()
    if is_writer_of_dir:
        _fsync_dir(staging_dir)
        if os.path.exists(final_dir):  # saving the same iteration again replaces it
            shutil.rmtree(final_dir)
        os.rename(staging_dir, final_dir)
        tracker_tmp = os.path.join(root, f".{TRACKER_FILENAME}.tmp")
        _write_durably(tracker_tmp, lambda f: f.write(str(iteration).encode()))
        os.replace(tracker_tmp, os.path.join(root, TRACKER_FILENAME))
        _fsync_dir(root)
    dist.barrier()
    return final_dir


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


def _check_compatible(saved_args: dict, args) -> None:
    for flag in SHAPE_FLAGS:
        saved, current = saved_args.get(flag), getattr(args, flag, None)
        if saved != current:
            name = "--" + flag.replace("_", "-")
            raise CheckpointError(f"the checkpoint was trained with {name} {saved} but this run has "
                                  f"{name} {current}; pass the checkpoint's value or use another --load.")


def _rank_file(root: str, iteration: int | None) -> tuple:
    """(iteration, path of this rank's file) of `iteration` (default: the marker's) in `root`."""
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise CheckpointError(f"--load {root!r}: no {TRACKER_FILENAME} there; pass a directory written "
                                  "by pretrain_lcot.py --save (or tools/convert_checkpoint.py).")
    path = os.path.join(iteration_dir(root, iteration), _rank_subdir(), CHECKPOINT_FILENAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"--load {root!r}: iteration {iteration} has no {path}; restore that directory, "
                              "pick another --iteration, or point the marker at an existing iteration.")
    return iteration, path


def saved_args(root: str, iteration: int | None = None) -> dict:
    """The flags a checkpoint was trained with (plain values), read without building anything:
    tools rebuild the model from these (`argparse.Namespace(**saved_args(root))`)."""
    _, path = _rank_file(root, iteration)
    return torch.load(path, map_location="cpu", weights_only=True)["args"]


def load_model_weights(root: str, model: torch.nn.Module, iteration: int | None = None) -> int:
    """Load only the model weights of a checkpoint into `model` (built with the checkpoint's
    flags and parallel layout); returns the iteration. The seam for export, generation and
    evaluation: they never see the optimizer or the file layout."""
    iteration, path = _rank_file(root, iteration)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
    return iteration


def load_checkpoint(root: str, components, args) -> TrainState:
    """Restore the latest checkpoint in `root` into the components' model parts, optimizer,
    scheduler and the RNGs; returns the run's TrainState. A fresh TrainState when `root` holds
    no checkpoint yet, so `--save D --load D` starts fresh the first time and resumes afterwards.
    """
    train_state = TrainState()
    if latest_iteration(root) is None:
        return train_state
    _, path = _rank_file(root, None)
    state = torch.load(path, map_location="cpu", weights_only=True)
    _check_compatible(state["args"], args)
    _load_model_state(components, state)
    components.optimizer.load_state_dict(state["optimizer"])
    if hasattr(components.optimizer, "load"):  # DeepSpeed: weights and ZeRO partitions
        components.optimizer.load(iteration_dir(root, state["iteration"]))
    components.scheduler.load_state_dict(state["opt_param_scheduler"])
    _restore_rng_state(state["rng_state"])
    train_state.load_state_dict(state)
    return train_state
