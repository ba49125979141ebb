"""The model as megatron-core ModuleSpecs: the decoder layer, the latent schedule, the router.

`get_lcot_model_spec(config)` returns one ModuleSpec whose submodules name every swappable part:

    ModuleSpec(LcotGPTModel, submodules=LcotSubmodules(
        decoder=<TransformerLayer spec: RMSNorm, SwiGLU, RoPE, GQA, LcotCoreAttention>,
        latent_schedule=StepwiseSchedule | InterleavedJacobiSchedule | None (vanilla),
        halting_router=LinearHaltingRouter | EntropyHaltingRouter | NoHalting | None (vanilla)))

A user swaps a router or a layout by passing another spec to `build_module` (see README).
The layer spec is megatron-core's own (local, or Transformer Engine when importable) with its
core attention replaced by ours, which takes the structured latent masks; nothing in
megatron-core is patched.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_lcot.model.attention import LcotCoreAttention
from megatron_lcot.model.config import LcotConfig
from megatron_lcot.model.halting import EntropyHaltingRouter, LinearHaltingRouter, NoHalting
from megatron_lcot.model.latent import InterleavedJacobiSchedule, StepwiseSchedule
from megatron_lcot.model.seeded_init import SeededTransformerLayer


@dataclass
class LcotSubmodules:
    """The swappable parts of LcotGPTModel (each a ModuleSpec or a module class)."""

    decoder: ModuleSpec
    latent_schedule: ModuleSpec | type | None = None
    halting_router: ModuleSpec | type | None = None


def transformer_engine_available() -> bool:
    return gpt_layer_specs.HAVE_TE


def get_lcot_layer_spec(use_te: bool | None = None) -> ModuleSpec:
    """A Llama decoder layer spec with LcotCoreAttention as its core attention, built as
    SeededTransformerLayer (layout-independent CPU initialisation).

    use_te: True = Transformer Engine linears/norms (must be importable), False = megatron-core's
    local modules, None = Transformer Engine when importable.
    """
    if use_te is None:
        use_te = transformer_engine_available()
    if use_te:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = LcotCoreAttention
    spec.module = SeededTransformerLayer
    return spec


def get_lcot_model_spec(config: LcotConfig, use_te: bool | None = None) -> ModuleSpec:
    """The whole model's spec for `config`'s mode (vanilla, interleaved, stepwise, adaptive)."""
    from megatron_lcot.model.lcot_model import LcotGPTModel

    if config.latent_steps == 0:
        schedule, router = None, None
    else:
        schedule = StepwiseSchedule if config.latent_layout == "stepwise" else InterleavedJacobiSchedule
        router = NoHalting
        if config.halting == "adaptive":
            router = EntropyHaltingRouter if config.halting_router == "entropy" else LinearHaltingRouter
    return ModuleSpec(
        module=LcotGPTModel,
        submodules=LcotSubmodules(
            decoder=get_lcot_layer_spec(use_te), latent_schedule=schedule, halting_router=router
        ),
    )
