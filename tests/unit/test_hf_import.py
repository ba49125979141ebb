"""Import from Hugging Face (fp32, CPU): a randomly initialised transformers LlamaForCausalLM
(GQA, untied embeddings) saved in the test, refusals of what we cannot represent, a bit-exact
round trip ours -> HF -> ours, and pretrain_lcot.py continuing from the imported checkpoint."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from tests.conftest import run_pretrain

VOCAB = 512


def _options(**overrides):
    values = dict(
        latent_steps=None,
        latent_layout=None,
        halting=None,
        halting_threshold=None,
        seq_length=64,
        target_tensor_parallel_size=1,
        target_pipeline_model_parallel_size=1,
    )
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, sotu_indexed_dataset):
    """A random LlamaForCausalLM (4 heads, 2 KV heads, untied) with the sotu tokenizer, saved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_lcot.data.tokenizers import SentencePieceTokenizer
    from megatron_lcot.hf.tokenizer_files import hf_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms, so a misplaced norm shows
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.8, 1.2)
    path = tmp_path_factory.mktemp("llama") / "hf"
    model.save_pretrained(path)
    hf_tokenizer(SentencePieceTokenizer(sotu_indexed_dataset["tokenizer_model"])).save_pretrained(path)
    return path, model


def _our_logits(checkpoint, ids):
    from megatron_lcot.inference.loading import load_trained_model

    trained = load_trained_model(str(checkpoint))
    with torch.no_grad():
        return trained.model(ids, torch.arange(ids.shape[1])[None]).logits[..., : trained.vocab_size], trained


@pytest.mark.parametrize("latent", [{}, {"latent_steps": 2, "halting": "adaptive"}])
def test_imported_llama_gives_transformers_logits(llama_dir, tmp_path, latent):
    from megatron_lcot.hf.import_llama import import_llama

    path, model = llama_dir
    result = import_llama(str(path), str(tmp_path / "ckpt"), _options(**latent))
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    ours, trained = _our_logits(tmp_path / "ckpt", ids)
    with torch.no_grad():
        theirs = model(input_ids=ids).logits
    if not latent:
        assert (ours - theirs).abs().max().item() < 1e-4
        return
    # latent: step 0 is exactly the Llama (embeddings folded by 1/scale); the router starts at 0.9
    assert result["embedding_fold"] == pytest.approx(1 / trained.model.config.embedding_scale)
    router = trained.model.halting_router
    assert torch.all(router.weight == 0) and torch.allclose(torch.sigmoid(router.bias), torch.tensor(0.9))
    token_inputs = (
        trained.model.embedding(input_ids=ids, position_ids=None) * trained.model.config.embedding_scale
    )
    llama_inputs = model.model.embed_tokens(ids).transpose(0, 1)
    assert (token_inputs - llama_inputs).abs().max().item() < 1e-6


def test_round_trip_ours_hf_ours_is_bit_exact(trained_checkpoints, tmp_path):
    from megatron_lcot.hf.export import export
    from megatron_lcot.hf.import_llama import import_llama
    from megatron_lcot.inference.loading import load_trained_model

    for mode in ("adaptive", "interleaved"):
        export(trained_checkpoints[mode], str(tmp_path / f"hf_{mode}"))
        import_llama(str(tmp_path / f"hf_{mode}"), str(tmp_path / f"back_{mode}"), _options())
        original = load_trained_model(trained_checkpoints[mode]).model.state_dict()
        again = load_trained_model(str(tmp_path / f"back_{mode}")).model.state_dict()
        tensors = [
            name
            for name, value in original.items()
            if isinstance(value, torch.Tensor) and name != "latent_schedule.jacobi_draws"
        ]
        assert set(tensors) <= set(again)
        for name in tensors:
            assert torch.equal(original[name], again[name]), name


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}, "rope_theta 500000"),
        ({"attention_bias": True}, "attention_bias true"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings true"),
        (
            {"architectures": ["MistralForCausalLM"], "model_type": "mistral"},
            "architectures ['MistralForCausalLM']",
        ),
        ({"hidden_size": 32, "head_dim": 8}, "config.json does not match the weights"),
        ({"vocab_size": 600}, "config.json does not match the weights"),
    ],
)
def test_unsupported_or_inconsistent_config_is_refused(llama_dir, tmp_path, change, message):
    import shutil

    from megatron_lcot.hf.errors import ConversionError
    from megatron_lcot.hf.import_llama import import_llama

    source, _ = llama_dir
    path = tmp_path / "hf"
    shutil.copytree(source, path)
    config = json.loads((path / "config.json").read_text())
    config.update(change)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        import_llama(str(path), str(tmp_path / "ckpt"), _options())
    assert not os.path.exists(tmp_path / "ckpt")  # nothing half-written


@pytest.mark.slow
def test_pretrain_continues_from_imported_llama(llama_dir, tmp_path, sotu_indexed_dataset):
    from megatron_lcot.hf.import_llama import import_llama

    path, _ = llama_dir
    result = import_llama(str(path), str(tmp_path / "ckpt"), _options(latent_steps=2, halting="adaptive"))
    flags = result["pretrain_flags"].split() + [
        "--micro-batch-size",
        "2",
        "--train-iters",
        "2",
        "--log-interval",
        "1",
        "--eval-iters",
        "1",
        "--split",
        "98,2,0",
        "--data-path",
        sotu_indexed_dataset["prefix"],
        "--load",
        str(tmp_path / "ckpt"),
        "--save",
        str(tmp_path / "continued"),
        "--metrics-file",
        str(tmp_path / "m.jsonl"),
    ]
    run = run_pretrain(flags, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in open(tmp_path / "m.jsonl")]
    assert [r["iteration"] for r in records if r["split"] == "train"] == [1, 2]
    assert os.path.isfile(tmp_path / "continued" / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt")


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]],
    ids=["tp2", "pp2"],
)
def test_round_trip_from_a_parallel_layout_is_bit_exact(sotu_indexed_dataset, tmp_path, layout):
    """An adaptive model trained at TP=2 or PP=2 (2 processes) exports from its layout-free
    weights and imports back to exactly the weights a one-process load of it holds."""
    import sys

    from megatron_lcot.hf.export import export
    from megatron_lcot.hf.import_llama import import_llama
    from megatron_lcot.inference.loading import load_trained_model
    from tests.conftest import TINY_MODEL_FLAGS

    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    flags = [
        *TINY_MODEL_FLAGS,
        "--latent-steps",
        "2",
        "--halting",
        "adaptive",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--train-iters",
        "2",
        "--lr",
        "3e-3",
        "--eval-iters",
        "1",
        "--split",
        "98,2,0",
        "--data-path",
        sotu_indexed_dataset["prefix"],
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        sotu_indexed_dataset["tokenizer_model"],
        "--data-cache-path",
        str(tmp_path / "cache"),
        "--save",
        str(tmp_path / "trained"),
        *layout,
    ]
    result = run_pretrain(flags, cwd=tmp_path, launcher=torchrun, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    export(str(tmp_path / "trained"), str(tmp_path / "hf"))
    import_llama(str(tmp_path / "hf"), str(tmp_path / "back"), _options())
    original = load_trained_model(str(tmp_path / "trained")).model.state_dict()
    again = load_trained_model(str(tmp_path / "back")).model.state_dict()
    tensors = [
        name
        for name, value in original.items()
        if isinstance(value, torch.Tensor) and name != "latent_schedule.jacobi_draws"
    ]
    assert "halting_router.weight" in tensors and set(tensors) <= set(again)
    for name in tensors:
        assert torch.equal(original[name], again[name]), name


def test_target_layout_needs_as_many_processes(llama_dir, tmp_path):
    from megatron_lcot.hf.errors import ConversionError
    from megatron_lcot.hf.import_llama import import_llama

    path, _ = llama_dir
    with pytest.raises(
        ConversionError,
        match="--target-tensor-parallel-size 2 x --target-pipeline-parallel-size 1 "
        "needs 2 processes, this run has 1; launch with torchrun",
    ):
        import_llama(str(path), str(tmp_path / "ckpt"), _options(target_tensor_parallel_size=2))
    assert not os.path.exists(tmp_path / "ckpt")


def _stored_chunks(root, suffix: str) -> int:
    """How many chunks dist_checkpointing stored for the tensors whose name ends with `suffix`."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(root / "iter_0000000" / "model")).read_metadata().state_dict_metadata
    return sum(
        len(entry.chunks)
        for name, entry in metadata.items()
        if name.endswith(suffix) and hasattr(entry, "chunks")
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout, latent",
    [((2, 1), ["--latent-steps", "2", "--halting", "adaptive"]), ((1, 2), [])],
    ids=["tp2_adaptive", "pp2_vanilla"],
)
def test_import_to_a_parallel_layout_equals_the_one_process_import(llama_dir, tmp_path, layout, latent):
    """from-hf under torchrun at TP=2 (adaptive) or PP=2 (vanilla) writes a checkpoint recording
    that layout whose weights are those of the one-process import, bit for bit, and whose
    logits (loaded in one process) are the one-process import's."""
    import subprocess
    import sys

    from megatron_lcot.checkpoint.checkpointing import saved_args
    from megatron_lcot.hf.import_llama import import_llama
    from tests.conftest import REPO_ROOT, read_checkpoint_weights, tool_env

    path, _ = llama_dir
    tp, pp = layout
    options = dict(zip(latent[::2], latent[1::2]))
    one = import_llama(
        str(path),
        str(tmp_path / "one"),
        _options(latent_steps=int(options.get("--latent-steps", 0)), halting=options.get("--halting")),
    )
    torchrun = (
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(tp * pp),
    )
    run = subprocess.run(
        [
            *torchrun,
            os.path.join(REPO_ROOT, "tools", "convert_checkpoint.py"),
            "from-hf",
            "--load",
            str(path),
            "--save",
            str(tmp_path / "parallel"),
            "--seq-length",
            "64",
            *latent,
            "--target-tensor-parallel-size",
            str(tp),
            "--target-pipeline-parallel-size",
            str(pp),
        ],
        cwd=tmp_path,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert (
        f"--tensor-model-parallel-size {tp} --pipeline-model-parallel-size {pp}" in report["pretrain_flags"]
    )
    assert report["pretrain_flags"].startswith(
        one["pretrain_flags"].replace(str(tmp_path / "one"), str(tmp_path / "parallel"))
    )
    args = saved_args(str(tmp_path / "parallel"))
    assert (args["tensor_model_parallel_size"], args["pipeline_model_parallel_size"]) == (tp, pp)
    assert sorted(os.listdir(tmp_path / "parallel")) == [
        "iter_0000000",
        "latest_checkpointed_iteration.txt",
        "tokenizer",
    ]  # the staging checkpoint is gone
    if tp > 1:  # written by TP ranks: the fused QKV is stored as TP times as many chunks
        assert _stored_chunks(tmp_path / "parallel", "linear_qkv.weight") == tp * _stored_chunks(
            tmp_path / "one", "linear_qkv.weight"
        )
    expected = read_checkpoint_weights(tmp_path / "one" / "iter_0000000", tmp_path)
    written = read_checkpoint_weights(tmp_path / "parallel" / "iter_0000000", tmp_path)
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    ours, _ = _our_logits(tmp_path / "one", ids)
    theirs, _ = _our_logits(tmp_path / "parallel", ids)
    assert torch.equal(ours, theirs)
