"""Flag validation: every invalid configuration is refused with a message naming the flag and
the fix, before any work; valid flags produce the derived values the loop relies on."""

from __future__ import annotations

import pytest

from megatron_lcot.arguments import ArgumentError, parse_args, set_padded_vocab_size
from tests.conftest import TINY_MODEL_FLAGS, run_pretrain

BASE = [*TINY_MODEL_FLAGS, "--train-iters", "2", "--mock-data", "--vocab-size", "100"]


def _replace(flags: list, **overrides) -> list:
    """BASE with `--flag value` pairs replaced or appended (value None: a bare switch)."""
    flags = list(flags)
    for name, value in overrides.items():
        flag = "--" + name.replace("_", "-")
        if flag in flags:
            index = flags.index(flag)
            del flags[index : index + 2]
        flags += [flag] if value is None else [flag, str(value)]
    return flags


INVALID = {
    "heads_not_divisible_by_groups": (
        dict(num_attention_heads=4, num_query_groups=3),
        ["--num-attention-heads 4", "--num-query-groups 3", "divides"],
    ),
    "negative_latent_steps": (dict(latent_steps=-1), ["--latent-steps -1", "negative"]),
    "adaptive_interleaved": (
        dict(latent_steps=2, halting="adaptive", latent_layout="interleaved"),
        ["--halting adaptive", "--latent-layout stepwise"],
    ),
    "adaptive_without_latent_steps": (dict(halting="adaptive"), ["--halting adaptive", "--latent-steps K"]),
    "global_batch_not_multiple": (
        dict(micro_batch_size=4, global_batch_size=6),
        ["--global-batch-size 6", "--micro-batch-size 4", "multiple of 4"],
    ),
    "seq_length_above_max_positions": (
        dict(seq_length=128, max_position_embeddings=64),
        ["--seq-length 128", "--max-position-embeddings 64"],
    ),
    "no_data": (dict(), ["--data-path", "--mock-data"]),
    "bad_jacobi_iters": (dict(jacobi_iters="2,x"), ["--jacobi-iters '2,x'", "e.g. --jacobi-iters 2,3"]),
    "warmup_not_below_train_iters": (dict(lr_warmup_iters=2), ["--lr-warmup-iters 2", "--train-iters 2"]),
    "save_interval_without_save": (dict(save_interval=1), ["--save-interval", "--save DIR"]),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_configuration_names_flag_and_fix(case):
    overrides, expected = INVALID[case]
    flags = _replace(BASE, **overrides)
    if case == "no_data":
        flags = [f for f in flags if f != "--mock-data"]
    with pytest.raises(ArgumentError) as error:
        parse_args(flags)
    for text in expected:
        assert text in str(error.value)


def test_latent_pipeline_needs_micro_batches_in_groups_of_stages(monkeypatch):
    """Latent passes run as virtual pipeline chunks: megatron-core's interleaved schedule wants
    the micro-batches in groups of the pipeline size; every latent mode is accepted then."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    pipeline = dict(pipeline_model_parallel_size=2, micro_batch_size=2)
    assert parse_args(_replace(BASE, **pipeline, global_batch_size=2)).num_microbatches == 1  # vanilla: 1F1B
    for layout in ("stepwise", "interleaved"):
        args = parse_args(
            _replace(BASE, **pipeline, global_batch_size=4, latent_steps=2, latent_layout=layout)
        )
        assert args.num_microbatches == 2
    with pytest.raises(ArgumentError) as error:
        parse_args(_replace(BASE, **pipeline, global_batch_size=6, latent_steps=1))
    for text in (
        "--pipeline-model-parallel-size 2",
        "multiple of 2 micro-batches",
        "got 3",
        "use --global-batch-size 4",
    ):
        assert text in str(error.value)


def test_data_path_without_bin_idx(tmp_path):
    (tmp_path / "corpus.idx").write_bytes(b"")
    prefix = str(tmp_path / "corpus")
    flags = [f for f in BASE if f != "--mock-data"] + ["--tokenizer-type", "NullTokenizer", "--data-path"]
    with pytest.raises(ArgumentError) as error:
        parse_args(flags + [prefix])
    assert f"--data-path {prefix!r}" in str(error.value) and f"{prefix}.bin not found" in str(error.value)
    (tmp_path / "corpus.bin").write_bytes(b"")
    with pytest.raises(ArgumentError, match=r"drop the extension \(--data-path .*corpus\)"):
        parse_args(flags + [prefix + ".bin"])
    assert parse_args(flags + [prefix]).data_blend == ([prefix], None)


def test_valid_flags_give_derived_values(tmp_path, monkeypatch):
    for name in ("a", "b"):
        for ext in (".bin", ".idx"):
            (tmp_path / (name + ext)).write_bytes(b"")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    monkeypatch.setenv("WORLD_SIZE", "4")
    flags = [f for f in BASE if f != "--mock-data"]
    args = parse_args(
        _replace(
            flags,
            tensor_model_parallel_size=2,
            micro_batch_size=2,
            global_batch_size=12,
            tokenizer_type="NullTokenizer",
            jacobi_iters="1,3",
        )
        + ["--data-path", "0.3", a, "0.7", b]
    )
    assert (args.data_parallel_size, args.num_microbatches) == (2, 3)
    assert args.data_blend == ([a, b], [0.3, 0.7])
    assert args.jacobi_iters == (1, 3)
    assert args.max_position_embeddings == args.seq_length and args.num_query_groups == 2
    set_padded_vocab_size(args, 50257)
    assert args.padded_vocab_size == 50432  # next multiple of 128 x TP 2 = 256


@pytest.mark.parametrize(
    "flags, expected",
    [
        (_replace(BASE, num_query_groups=3), "--num-query-groups 3"),
        (_replace(BASE, tokenizer_type="SentencePieceTokenizer"), "--tokenizer-model is required"),
    ],
)
def test_cli_refuses_without_traceback(tmp_path, flags, expected):
    result = run_pretrain(flags, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert expected in result.stderr
    assert result.stderr.strip().startswith("pretrain_lcot.py: error:")
    assert "Traceback" not in result.stderr + result.stdout


def test_deepspeed_refuses_latent_pipeline_with_the_alternative(monkeypatch):
    """The pass chunks call the model under the engine, so ZeRO would not see their backward."""
    import os

    from tests.conftest import REPO_ROOT

    monkeypatch.setenv("WORLD_SIZE", "2")
    zero1 = os.path.join(REPO_ROOT, "examples", "ds_configs", "zero1.json")
    flags = _replace(
        BASE,
        pipeline_model_parallel_size=2,
        micro_batch_size=2,
        global_batch_size=4,
        latent_steps=1,
        deepspeed=None,
        deepspeed_config=zero1,
    )
    with pytest.raises(ArgumentError) as error:
        parse_args(flags)
    for text in (
        "--deepspeed with --pipeline-model-parallel-size > 1 runs vanilla models only",
        "--use-distributed-optimizer",
    ):
        assert text in str(error.value)
