"""RunConfig: the whole run as typed, frozen data, one section per builder.

The flags are parsed and validated by `megatron_lcot.arguments`; `RunConfig.from_args` then
copies every flag into the section that owns it *by field name* (`--latent-steps` ->
`model.latent_steps`), in this one place (a test checks that every flag has its field).
Every field has one default, here (or, for the latent fields, in `LcotConfig`), and the
parser reads its defaults and choices from these fields. Sections are frozen: nothing changes
the configuration after validation; values derived later (the padded vocabulary) are filled
before the RunConfig is built.

    model       ModelSection: the network; `lcot_config(tp, pp)` makes the megatron-core
                LcotConfig for a layout (a fresh one each time: megatron-core and the
                optimizer seams write hooks into the config they are given)
    data        DataSection: datasets, blend, split, tokenizer
    training    TrainingSection: batch sizes, iterations, evaluation cadence
    optimizer   OptimizerSection: Adam, LR/weight-decay schedule, clipping, fp16 loss scale
    parallel    ParallelSection: TP/PP/DP sizes, the data-parallel engine
    checkpoint  CheckpointSection: where and how often to save, what to load
    logging     LoggingSection: log cadence and sinks
    faults      FaultsSection: exits, skipped steps, collective timeouts

Checkpoints store `to_dict()` (plain values, versioned); `from_dict` reads it back.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import torch

from megatron_lcot.model.config import LcotConfig

RUN_CONFIG_VERSION = 1

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
TRANSFORMER_IMPLS = ("local", "transformer_engine")
WANDB_MODES = ("offline", "online", "disabled")
ZERO_STAGES = (0, 1, 2, 3)


def _lcot_default(name: str):
    """The default of an LcotConfig field: the latent fields' one default lives there."""
    return next(f.default for f in dataclasses.fields(LcotConfig) if f.name == name)


@dataclass(frozen=True)
class ModelSection:
    """The flags that fix the network. None = derived by the Llama recipe (`llama_config`)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    seq_length: int
    padded_vocab_size: int | None = None
    """The tokenizer's ids rounded up to --make-vocab-size-divisible-by x TP (None until the
    tokenizer is known: `arguments.set_padded_vocab_size`)."""
    ffn_hidden_size: int | None = None
    num_query_groups: int | None = None
    max_position_embeddings: int | None = None
    init_method_std: float | None = None
    make_vocab_size_divisible_by: int = 128
    use_cpu_initialization: bool = False
    transformer_impl: str = "local"
    bf16: bool = False
    fp16: bool = False
    seed: int = 1234
    core_attention_backend: str = _lcot_default("core_attention_backend")
    latent_recompute: str | None = _lcot_default("latent_recompute")
    latent_steps: int = _lcot_default("latent_steps")
    latent_layout: str = _lcot_default("latent_layout")
    halting: str = _lcot_default("halting")
    halting_router: str = _lcot_default("halting_router")
    halting_threshold: float = _lcot_default("halting_threshold")
    halting_loss_weight: float = _lcot_default("halting_loss_weight")
    halting_correctness_exponent: float = _lcot_default("halting_correctness_exponent")
    halting_warmup_iters: int = _lcot_default("halting_warmup_iters")
    halting_warmup_ramp_threshold: bool = _lcot_default("halting_warmup_ramp_threshold")
    halting_penalty_fraction: float = _lcot_default("halting_penalty_fraction")
    jacobi_iters: tuple = _lcot_default("jacobi_iters")
    jacobi_eval_iters: int = _lcot_default("jacobi_eval_iters")

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32

    def lcot_config(
        self,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        batch_p2p_comm: bool = True,
    ) -> LcotConfig:
        """The megatron-core config of this network at a TP/PP layout (Llama recipe: RMSNorm,
        SwiGLU, no biases). `batch_p2p_comm` is False on gloo, where batched p2p is wrong."""
        from megatron_lcot.model.config import llama_config

        recipe = (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "ffn_hidden_size",
            "num_query_groups",
            "init_method_std",
        )
        config_fields = {f.name for f in dataclasses.fields(LcotConfig)} - set(recipe)
        by_name = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name in config_fields and getattr(self, f.name) is not None
        }
        return llama_config(
            *(getattr(self, name) for name in recipe),
            **by_name,
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            params_dtype=self.params_dtype,
            pipeline_dtype=self.params_dtype,
            batch_p2p_comm=batch_p2p_comm,
        )


@dataclass(frozen=True)
class DataSection:
    data_path: tuple | None = None
    data_blend: tuple | None = None
    """(prefixes, weights or None), parsed from data_path by the validation."""
    split: str = "969,30,1"
    data_cache_path: str | None = None
    mock_data: bool = False
    num_workers: int = 2
    tokenizer_type: str | None = None
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    vocab_size: int | None = None


@dataclass(frozen=True)
class TrainingSection:
    train_iters: int
    micro_batch_size: int = 1
    global_batch_size: int | None = None
    num_microbatches: int = 1
    eval_interval: int = 1000
    eval_iters: int = 100
    skip_train: bool = False
    torch_compile: bool = False


@dataclass(frozen=True)
class OptimizerSection:
    lr: float = 3e-4
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 0
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    loss_scale: float | None = None
    initial_loss_scale: float = 2.0**32
    halting_router_lr_mult: float = 1.0


@dataclass(frozen=True)
class ParallelSection:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    world_size: int = 1
    data_parallel_size: int = 1
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    deepspeed: bool = False
    deepspeed_config: str | None = None
    zero_stage: int | None = None


@dataclass(frozen=True)
class CheckpointSection:
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    keep_last: int | None = None


@dataclass(frozen=True)
class LoggingSection:
    log_interval: int = 100
    metrics_file: str | None = None
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    wandb_mode: str = "offline"


@dataclass(frozen=True)
class FaultsSection:
    exit_signal_handler: bool = False
    exit_duration_in_mins: float | None = None
    exit_interval: int | None = None
    max_skipped_steps_in_a_row: int = 10
    distributed_timeout_minutes: float = 10.0


SECTIONS = {
    "model": ModelSection,
    "data": DataSection,
    "training": TrainingSection,
    "optimizer": OptimizerSection,
    "parallel": ParallelSection,
    "checkpoint": CheckpointSection,
    "logging": LoggingSection,
    "faults": FaultsSection,
}


def field_default(name: str):
    """The one default of the field `name` (whichever section holds it): what the parser uses."""
    for section in SECTIONS.values():
        for section_field in dataclasses.fields(section):
            if section_field.name == name:
                return section_field.default
    raise KeyError(f"no RunConfig field named {name!r}")


def _plain(value):
    """Tuples as lists, recursively (what `torch.load(weights_only=True)` reads back)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def section_from_values(section: type, values):
    """One section (a dataclass type of SECTIONS) with its fields read by name from `values`
    (flags or a dict, as in `RunConfig.from_values`); a field `values` lacks keeps its default."""
    get = values.get if isinstance(values, dict) else lambda name, default: getattr(values, name, default)
    missing = object()
    given = {f.name: _tupled(get(f.name, missing)) for f in dataclasses.fields(section)}
    return section(**{k: v for k, v in given.items() if v is not missing})


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=lambda: TrainingSection(train_iters=0))
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    faults: FaultsSection = field(default_factory=FaultsSection)

    @classmethod
    def from_values(cls, values) -> RunConfig:
        """Each section's fields read by name from `values`: the validated flags (an
        `argparse.Namespace`) or the flags a checkpoint written before the RunConfig stored (a
        dict). A field that `values` lacks keeps its default; a required one raises TypeError."""
        return cls(**{name: section_from_values(section, values) for name, section in SECTIONS.items()})

    def to_dict(self) -> dict:
        """Plain values, one dict per section, and the format version."""
        return {
            "version": RUN_CONFIG_VERSION,
            **{
                name: {k: _plain(v) for k, v in dataclasses.asdict(getattr(self, name)).items()}
                for name in SECTIONS
            },
        }

    @classmethod
    def from_dict(cls, stored: dict) -> RunConfig:
        """The inverse of `to_dict` (ValueError on a version this code does not know)."""
        if stored.get("version") != RUN_CONFIG_VERSION:
            raise ValueError(
                f"run configuration version {stored.get('version')!r}; this code reads version "
                f"{RUN_CONFIG_VERSION}"
            )
        return cls(
            **{
                name: section(**{k: _tupled(v) for k, v in stored[name].items()})
                for name, section in SECTIONS.items()
            }
        )

    def as_flags(self) -> argparse.Namespace:
        """Every section's fields in one namespace, named as the flags (field names are unique
        across sections): what a checkpoint stores beside the RunConfig and compares by flag
        name (checkpoint/checkpointing.py)."""
        return argparse.Namespace(
            **{
                f.name: getattr(getattr(self, name), f.name)
                for name, section in SECTIONS.items()
                for f in dataclasses.fields(section)
            }
        )

    def for_one_process(self) -> RunConfig:
        """The same run at TP = PP = 1 (what tools build to evaluate, export or generate)."""
        return dataclasses.replace(
            self,
            parallel=dataclasses.replace(
                self.parallel, tensor_model_parallel_size=1, pipeline_model_parallel_size=1
            ),
        )
