"""The typed run configuration: every flag has one field (and its default there), sections are
frozen, checkpoints store the RunConfig, and checkpoints written before it (flags only) load.

`tests/fixtures/checkpoint_flags_only` was written by pretrain_lcot.py before the RunConfig
existed (1 layer, hidden 16, adaptive K=1, --halting-threshold 0.07, --mock-data, one
iteration); its optimizer file was left out (weights and `run.pt` only). The logits below were
computed from it by that code.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from megatron_lcot.arguments import build_parser, parse_args
from megatron_lcot.run_config import RUN_CONFIG_VERSION, SECTIONS, RunConfig, field_default

FLAGS_ONLY_CHECKPOINT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "checkpoint_flags_only")
# The old code's logits for tokens arange(16) % 60: [0, 0, :4] and the float64 sum over all.
OLD_LOGITS_FIRST = [0.9647045135498047, 0.5401095747947693, -1.2766629457473755, 0.003755513345822692]
OLD_LOGITS_SUM = -28.163628675305517
FLAGS = [
    "--num-layers",
    "2",
    "--hidden-size",
    "32",
    "--num-attention-heads",
    "4",
    "--seq-length",
    "16",
    "--train-iters",
    "3",
    "--mock-data",
    "--vocab-size",
    "100",
]


def test_every_flag_is_one_field_with_the_fields_default():
    parser = build_parser()
    owners = {}
    for name, section in SECTIONS.items():
        for section_field in dataclasses.fields(section):
            assert section_field.name not in owners, (
                f"{section_field.name} in {owners.get(section_field.name)} and {name}"
            )
            owners[section_field.name] = name
    for action in parser._actions:
        if action.dest in ("help", "local_rank"):
            continue
        assert action.dest in owners, f"--{action.dest} has no RunConfig field"
        if action.dest == "jacobi_iters":  # parsed from text
            assert action.default == ",".join(map(str, field_default("jacobi_iters")))
        elif not action.required:
            assert action.default == field_default(action.dest), action.dest


def test_from_values_reads_every_section_by_name_and_sections_are_frozen():
    args = parse_args(
        FLAGS + ["--latent-steps", "2", "--halting", "adaptive", "--lr", "1e-3", "--log-interval", "7"]
    )
    config = RunConfig.from_values(args)
    assert (config.model.latent_steps, config.model.halting, config.optimizer.lr) == (2, "adaptive", 1e-3)
    assert (config.logging.log_interval, config.training.train_iters, config.data.mock_data) == (7, 3, True)
    assert config.model.halting_threshold == 0.05 == field_default("halting_threshold")
    assert config.model.jacobi_iters == (2, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model.latent_steps = 3
    stored = config.to_dict()
    assert stored["version"] == RUN_CONFIG_VERSION
    assert RunConfig.from_dict(stored) == config
    with pytest.raises(ValueError, match="run configuration version 99"):
        RunConfig.from_dict({**stored, "version": 99})


def _logits(trained) -> torch.Tensor:
    tokens = (torch.arange(16) % 60).view(1, 16)
    with torch.no_grad():
        return trained.model(tokens, torch.arange(16).view(1, 16), attention_mask=None).logits


def test_a_checkpoint_of_flags_only_loads_and_is_saved_again_with_its_run_config(tmp_path):
    from megatron_lcot import parallel
    from megatron_lcot.checkpoint.checkpointing import load_run_config, save_weights_only
    from megatron_lcot.inference.loading import load_trained_model

    trained = load_trained_model(FLAGS_ONLY_CHECKPOINT)
    try:
        assert trained.config.model.halting_threshold == 0.07
        assert (trained.config.model.latent_steps, trained.config.model.padded_vocab_size) == (1, 72)
        logits = _logits(trained)
        assert logits[0, 0, :4].tolist() == pytest.approx(OLD_LOGITS_FIRST, rel=1e-6)
        assert float(logits.double().sum()) == pytest.approx(OLD_LOGITS_SUM, rel=1e-6)

        save_weights_only(str(tmp_path), 1, trained.model, trained.config, sharded=True)
        stored = torch.load(tmp_path / "iter_0000001" / "run.pt", weights_only=True)
        assert stored["run_config"]["version"] == RUN_CONFIG_VERSION
        assert load_run_config(str(tmp_path)) == trained.config
        again = load_trained_model(str(tmp_path))
        assert again.config == trained.config
        assert torch.equal(_logits(again), logits)
    finally:
        parallel.destroy()
