"""Training pieces in isolation: statistics, the resumable sampler, the optimizer seam,
checkpoint atomicity and compatibility checks."""

from __future__ import annotations

import math
import os
import re

import pytest
import torch

from megatron_lcot.data.datasets import PretrainingSampler
from megatron_lcot.model import LcotOutput
from megatron_lcot.run_config import RunConfig
from megatron_lcot.training.metrics import summarize, token_statistics
from megatron_lcot.training.state import TrainState


def test_token_statistics_count_only_loss_tokens():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    steps = torch.tensor([[0.0, 2.0, 2.0], [1.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the 100.0 / 0-step token is padding
    output = LcotOutput(loss=loss + 0.5, lm_loss=loss, latent_steps=steps, expected_latent_steps=steps * 0.5)
    first = token_statistics(output, mask, max_latent_steps=2)
    summary = summarize(first + token_statistics(output, mask, max_latent_steps=2))  # two micro-batches
    assert summary["lm_loss"] == pytest.approx(15 / 5) and summary["loss"] == pytest.approx(17.5 / 5)
    assert summary["mean_latent_steps"] == pytest.approx(7 / 5)
    assert summary["expected_latent_steps"] == pytest.approx(3.5 / 5)
    assert summary["halted_share"] == [0.2, 0.2, 0.6]


def test_token_statistics_vanilla_has_no_latent_steps():
    loss = torch.ones(2, 4)
    summary = summarize(token_statistics(LcotOutput(loss=loss, lm_loss=loss), torch.ones(2, 4), 0))
    assert summary["halted_share"] == [1.0] and summary["mean_latent_steps"] == 0.0
    assert summary["expected_latent_steps"] is None


def test_sampler_shards_by_rank_and_resumes_where_it_stopped():
    ranks = [
        list(PretrainingSampler(20, 0, micro_batch_size=2, data_parallel_rank=r, data_parallel_size=2))
        for r in range(2)
    ]
    assert ranks[0][:2] == [[0, 1], [4, 5]] and ranks[1][:2] == [[2, 3], [6, 7]]
    assert len(ranks[0]) == 5 and sorted(i for rank in ranks for batch in rank for i in batch) == list(
        range(20)
    )
    assert list(PretrainingSampler(20, 8, 2, 1, 2)) == ranks[1][2:]


def _with(config: RunConfig, changes: dict) -> RunConfig:
    """`config` with some fields (by flag name) changed."""
    return RunConfig.from_values({**vars(config.as_flags()), **changes})


@pytest.fixture(scope="module")
def tiny_training_state():
    """(RunConfig, model, optimizer, scheduler) for a 1-layer vanilla model on a world of one."""
    from megatron_lcot import parallel
    from megatron_lcot.model import build_lcot_model, llama_config
    from megatron_lcot.parallel.optimizer import build_lr_scheduler, build_optimizer

    parallel.initialize(1, 1, seed=7)
    config = RunConfig.from_values(  # every other field at its default
        dict(
            num_layers=1,
            hidden_size=32,
            ffn_hidden_size=64,
            num_attention_heads=2,
            num_query_groups=2,
            seq_length=16,
            padded_vocab_size=128,
            lr=1e-2,
            train_iters=10,
            weight_decay=0.1,
            adam_beta2=0.95,
            overlap_grad_reduce=False,
            overlap_param_gather=False,
        )
    )
    model = build_lcot_model(
        llama_config(1, 32, 2, ffn_hidden_size=64), vocab_size=128, max_sequence_length=16
    )
    optimizer = build_optimizer([model], config)
    scheduler = build_lr_scheduler(optimizer, config.optimizer, config.training.train_iters)
    return config, model, optimizer, scheduler


def _components(model, optimizer, scheduler):
    from megatron_lcot.training.state import TrainComponents

    return TrainComponents(model_parts=[model], optimizer=optimizer, scheduler=scheduler)


def _at(iteration: int, consumed_samples: int):
    return TrainState(iteration=iteration, consumed_train_samples=consumed_samples)


def _train_one_step(model, optimizer, scheduler) -> float:
    tokens = torch.randint(0, 128, (2, 17))
    output = model(tokens[:, :-1], torch.arange(16).expand(2, 16), labels=tokens[:, 1:])
    optimizer.zero_grad()
    output.loss.mean().backward()
    grad_norm = optimizer.step()
    scheduler.step(1)
    return grad_norm


def test_optimizer_clips_to_global_norm_and_skips_decay_on_vectors(tiny_training_state):
    """megatron-core's optimizer behind the seam: the returned norm is the pre-clip global norm
    of the gradients DDP accumulated (`main_grad`), the applied gradients are clipped to
    --clip-grad, and only matrices decay."""
    config, model, optimizer, scheduler = tiny_training_state
    decayed, plain = optimizer.param_groups
    assert all(p.ndim == 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert decayed["weight_decay"] == config.optimizer.weight_decay and plain["weight_decay"] == 0.0
    optimizer.zero_grad()
    for param in model.parameters():
        param.main_grad.fill_(3.0)
    expected_norm = 3.0 * math.sqrt(sum(p.numel() for p in model.parameters()))
    assert optimizer.step() == pytest.approx(expected_norm)
    clipped = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model.parameters()))
    assert clipped == pytest.approx(config.optimizer.clip_grad, rel=1e-5)


def test_checkpoint_crash_leaves_previous_checkpoint(tiny_training_state, tmp_path, monkeypatch):
    from megatron_lcot.checkpoint import checkpointing
    from megatron_lcot.parallel.optimizer import build_lr_scheduler

    config, model, optimizer, scheduler = tiny_training_state
    _train_one_step(model, optimizer, scheduler)
    components = _components(model, optimizer, scheduler)
    checkpointing.save_checkpoint(str(tmp_path), _at(1, 2), components, config)
    saved = {k: v.clone() for k, v in model.state_dict().items() if v is not None}
    _train_one_step(model, optimizer, scheduler)

    real_save = torch.save

    def crash_midway(state, f):  # the weights are written; the per-rank training state is not
        if isinstance(f, str):
            return real_save(state, f)
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing.torch, "save", crash_midway)
    with pytest.raises(checkpointing.CheckpointSaveError, match="rank 0 \\(OSError: disk full\\)"):
        checkpointing.save_checkpoint(str(tmp_path), _at(2, 4), components, config)
    monkeypatch.undo()
    assert checkpointing.latest_iteration(str(tmp_path)) == 1
    assert not os.path.exists(tmp_path / "iter_0000002")

    fresh_scheduler = build_lr_scheduler(
        optimizer, config.optimizer, config.training.train_iters
    )  # as a new process
    restored = _components(model, optimizer, fresh_scheduler)
    loaded = checkpointing.load_checkpoint(str(tmp_path), restored, config, TrainState())
    assert (loaded.iteration, loaded.consumed_train_samples) == (1, 2)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items() if v is not None)
    assert fresh_scheduler.num_steps == 1
    checkpointing.save_checkpoint(str(tmp_path), _at(2, 4), components, config)
    assert sorted(os.listdir(tmp_path)) == [
        "iter_0000001",
        "iter_0000002",
        "latest_checkpointed_iteration.txt",
    ]
    assert sorted(os.listdir(tmp_path / "iter_0000002")) == ["model", "mp_rank_00", "run.pt"]


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("hidden_size", 64, "--hidden-size 32 but this run has --hidden-size 64"),
        (
            "latent_layout",
            "interleaved",
            "--latent-layout stepwise but this run has --latent-layout interleaved",
        ),
        ("init_method_std", 0.02, "--init-method-std None but this run has --init-method-std 0.02"),
        ("lr", 1e-3, "--lr 0.01 but this run has --lr 0.001"),
        ("train_iters", 20, "--train-iters 10 but this run has --train-iters 20"),
        (
            "tensor_model_parallel_size",
            2,
            "--tensor-model-parallel-size 1 but this run has "
            "--tensor-model-parallel-size 2; resume at the checkpoint's layout",
        ),
    ],
)
def test_checkpoint_refuses_a_flag_that_changes_the_model_or_schedule(
    tiny_training_state, tmp_path, flag, value, message
):
    """The message names the flag (megatron-core's scheduler would only assert on --lr)."""
    from megatron_lcot.checkpoint import checkpointing

    config, model, optimizer, scheduler = tiny_training_state
    components = _components(model, optimizer, scheduler)
    checkpointing.save_checkpoint(str(tmp_path), _at(3, 6), components, config)
    other = _with(config, {flag: value})
    with pytest.raises(checkpointing.CheckpointError, match=re.escape(message)):
        checkpointing.load_checkpoint(str(tmp_path), components, other, TrainState())
    fresh = checkpointing.load_checkpoint(str(tmp_path / "empty"), components, config, TrainState())
    assert (fresh.iteration, fresh.consumed_train_samples) == (0, 0)


def test_keep_last_prunes_old_iterations_but_never_the_marked_one(tiny_training_state, tmp_path):
    from megatron_lcot.checkpoint import checkpointing

    config, model, optimizer, scheduler = tiny_training_state
    components = _components(model, optimizer, scheduler)
    keep_two = _with(config, {"keep_last": 2})
    for iteration in (1, 2, 3, 4):
        checkpointing.save_checkpoint(str(tmp_path), _at(iteration, iteration), components, keep_two)
    assert sorted(os.listdir(tmp_path)) == [
        "iter_0000003",
        "iter_0000004",
        "latest_checkpointed_iteration.txt",
    ]
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3")  # e.g. a user rolled the marker back
    checkpointing.save_checkpoint(str(tmp_path), _at(5, 5), components, config)  # no pruning
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3")
    assert checkpointing.prune_old_iterations(str(tmp_path), 1) == [4]
    assert sorted(os.listdir(tmp_path)) == [
        "iter_0000003",
        "iter_0000005",
        "latest_checkpointed_iteration.txt",
    ]


def test_weights_load_from_sharded_and_plain_weights_only_checkpoints(tiny_training_state, tmp_path):
    """save_weights_only in both formats round-trips through load_model_weights, and training
    refuses to resume from a weights-only checkpoint with a message that says what it is."""
    from megatron_lcot.checkpoint import checkpointing

    config, model, optimizer, scheduler = tiny_training_state
    _train_one_step(model, optimizer, scheduler)
    trained = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    for sharded in (True, False):
        root = str(tmp_path / f"sharded{sharded}")
        checkpointing.save_weights_only(root, 7, model, config, sharded=sharded)
        assert os.path.isdir(os.path.join(root, "iter_0000007", "model")) == sharded
        with torch.no_grad():
            for param in model.parameters():
                param.zero_()
        assert checkpointing.load_model_weights(root, model) == 7
        assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items() if k in trained)
        assert checkpointing.saved_args(root)["hidden_size"] == 32
        with pytest.raises(checkpointing.CheckpointError, match="holds weights only .* --skip-train"):
            checkpointing.load_checkpoint(
                root, _components(model, optimizer, scheduler), config, TrainState()
            )


def test_bf16_weights_keep_fp32_main_copies(tiny_training_state):
    """Under --bf16 the seam keeps fp32 main weights: updates far below bf16 resolution
    accumulate there, the bf16 weight is the main weight rounded, and the main copies survive
    a state_dict round trip into a fresh optimizer."""
    from megatron_lcot.model import build_lcot_model, llama_config
    from megatron_lcot.parallel.optimizer import build_lr_scheduler, build_optimizer

    config = _with(tiny_training_state[0], {"bf16": True, "lr": 1e-5, "clip_grad": 0.0})

    def build():
        model_config = llama_config(1, 32, 2, ffn_hidden_size=64, params_dtype=torch.bfloat16, bf16=True)
        model = build_lcot_model(model_config, vocab_size=128, max_sequence_length=16).bfloat16()
        return model, build_optimizer([model], config)

    def main_weights(optimizer) -> list:
        inner = getattr(optimizer.optimizer, "chained_optimizers", [optimizer.optimizer])
        return [main for opt in inner for group in opt.fp32_from_float16_groups for main in group]

    model, optimizer = build()
    scheduler = build_lr_scheduler(optimizer, config.optimizer, config.training.train_iters)
    before = main_weights(optimizer)[0].clone()
    for _ in range(3):
        _train_one_step(model, optimizer, scheduler)
    mains = main_weights(optimizer)
    assert all(main.dtype == torch.float32 for main in mains)
    assert not torch.equal(mains[0], before)  # the fp32 weight moved by ~3e-5 ...
    params = [p for p in model.parameters() if p.dtype == torch.bfloat16]
    assert params[0].dtype == torch.bfloat16 and torch.equal(params[0], mains[0].to(torch.bfloat16))
    assert not torch.equal(mains[0], params[0].float())  # ... which bf16 cannot hold
    fresh_model, restored = build()
    restored.load_state_dict(optimizer.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(main_weights(restored), mains, strict=True))


def test_distributed_optimizer_state_round_trips(tiny_training_state, tmp_path):
    """--use-distributed-optimizer: the seam saves its sharded fp32 weights and Adam moments
    (each data-parallel rank its own shard, through dist_checkpointing); loading them into a
    fresh model and optimizer restores them (the next step agrees)."""
    from megatron_lcot.model import build_lcot_model, llama_config
    from megatron_lcot.parallel.optimizer import build_lr_scheduler, build_optimizer

    config = _with(tiny_training_state[0], {"use_distributed_optimizer": True})

    def build():
        torch.manual_seed(11)
        model = build_lcot_model(
            llama_config(1, 32, 2, ffn_hidden_size=64), vocab_size=128, max_sequence_length=16
        )
        optimizer = build_optimizer([model], config)
        return model, optimizer, build_lr_scheduler(optimizer, config.optimizer, config.training.train_iters)

    model, optimizer, scheduler = build()
    for _ in range(2):
        _train_one_step(model, optimizer, scheduler)
    saved_model = {k: v.clone() for k, v in model.state_dict().items() if v is not None}
    assert optimizer.saves_own_files  # the shards are written by every rank, never gathered
    optimizer.save(str(tmp_path))

    fresh_model, fresh_optimizer, _ = build()
    fresh_model.load_state_dict(saved_model, strict=False)
    fresh_optimizer.load(str(tmp_path))
    torch.manual_seed(5)
    expected = _train_one_step(model, optimizer, scheduler)
    torch.manual_seed(5)
    got = _train_one_step(fresh_model, fresh_optimizer, scheduler)
    assert got == pytest.approx(expected, rel=1e-6)
    for name, tensor in model.state_dict().items():
        if tensor is not None:
            assert torch.equal(tensor, fresh_model.state_dict()[name]), name
