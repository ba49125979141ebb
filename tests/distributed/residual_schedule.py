"""A custom latent schedule, swapped in through the model spec, and pretrain_lcot.py with it.

`ResidualThoughtSchedule` overrides one hook of the stepwise schedule: the input of latent pass
k >= 1 is the previous step's output plus the token's own embedding (a residual thought). It
reads the token states in every later pass, so under pipeline parallelism they cross chunks on
the first stage, which the built-in schedules never ask for. Nothing else changes: training,
pipeline chunks and cached decoding drive it through the same hooks.

Run as a script it is pretrain_lcot.py with the schedule in the model spec (used by
tests/distributed/test_pipeline_equivalence.py, in one process and under torchrun).
"""

from __future__ import annotations

import sys
from functools import partial

from megatron_lcot.model.latent import StepwiseSchedule


class ResidualThoughtSchedule(StepwiseSchedule):
    def pass_inputs(self, run, index, previous):
        return run.token_states if index == 0 else previous + run.token_states


def residual_model_provider(run_config, pre_process: bool = True, post_process: bool = True):
    """model/building.py's model with the residual schedule in its spec."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_lcot import parallel
    from megatron_lcot.model import get_lcot_model_spec

    model, layout = run_config.model, run_config.parallel
    config = model.lcot_config(
        layout.tensor_model_parallel_size,
        layout.pipeline_model_parallel_size,
        batch_p2p_comm=parallel.backend() != "gloo",
    )
    spec = get_lcot_model_spec(config, use_te=model.transformer_impl == "transformer_engine")
    spec.submodules.latent_schedule = ResidualThoughtSchedule
    return build_module(
        spec,
        config=config,
        vocab_size=model.padded_vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
    )


def main(argv: list) -> None:
    """pretrain_lcot.py's main with the residual schedule's model provider."""
    from megatron_lcot.arguments import parse_args, set_padded_vocab_size
    from megatron_lcot.data.tokenizers import build_tokenizer
    from megatron_lcot.run_config import RunConfig
    from megatron_lcot.training.loop import pretrain
    from megatron_lcot.training.providers import forward_step, train_valid_test_datasets_provider

    args = parse_args(argv)
    tokenizer = build_tokenizer(
        args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file, args.vocab_size
    )
    set_padded_vocab_size(args, tokenizer.vocab_size)
    pretrain(
        RunConfig.from_values(args),
        partial(train_valid_test_datasets_provider, tokenizer),
        residual_model_provider,
        forward_step,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
