"""The Hugging Face workflow a user runs on an export, through transformers alone (a subprocess
where megatron and megatron_lcot cannot be imported), on `halting_checkpoint` (adaptive K=3 whose
tokens halt after every count of latent steps, most before K) and the vanilla checkpoint:

* sharded safetensors (a tiny --max-shard-size) with transformers' `model.safetensors.index.json`,
  loaded by `from_pretrained`: logits equal our own scorer's, per-token latent steps equal ours;
* `pipeline("text-generation", model=DIR, trust_remote_code=True)`: our greedy completion;
* `from_pretrained(torch_dtype=torch.bfloat16)`: bf16 weights, logits near fp32;
* `save_pretrained` + reload: identical logits;
* the import back (`from-hf`) gives our scorer's logits on the halting checkpoint;
* the model card states what the checkpoint holds.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.unit.hf_fixtures import halting_shares, held_out_ids, run_without_megatron

PROMPT = "The Congress of the United States"
WINDOW = 64
NEW_TOKENS = 12
SHARD_BYTES = 60_000  # the tiny models hold ~0.5 MB: several shards

_HF_SIDE = """
import json, os, torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, pipeline
job = json.load(open('job.json'))
out = {}
for name, spec in job.items():
    path, ids = spec['dir'], torch.tensor([spec['ids']])
    index = json.load(open(os.path.join(path, 'model.safetensors.index.json')))
    stored, stored_bytes = {}, 0
    for shard in sorted(set(index['weight_map'].values())):
        with safe_open(os.path.join(path, shard), 'pt') as f:
            for key in f.keys():
                stored[key] = shard
                stored_bytes += f.get_tensor(key).numel() * f.get_tensor(key).element_size()
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        output = model(input_ids=ids)
    steps = getattr(output, 'latent_steps', None)
    bf16 = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, torch_dtype=torch.bfloat16).eval()
    with torch.no_grad():
        bf16_logits = bf16(input_ids=ids).logits
    model.save_pretrained('resaved_' + name)
    again = AutoModelForCausalLM.from_pretrained('resaved_' + name, trust_remote_code=True,
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        again_logits = again(input_ids=ids).logits
    generator = pipeline('text-generation', model=path, trust_remote_code=True)
    completion = generator(spec['prompt'], max_new_tokens=spec['new_tokens'], do_sample=False)
    completion_ids = generator(spec['prompt'], max_new_tokens=spec['new_tokens'], do_sample=False,
                               return_tensors=True)[0]['generated_token_ids']
    torch.save({'logits': output.logits, 'bf16': bf16_logits.float()}, name + '_logits.pt')
    out[name] = {
        'index_metadata': index['metadata'], 'weight_map': index['weight_map'], 'stored': stored,
        'stored_bytes': stored_bytes, 'files': sorted(os.listdir(path)),
        'latent_steps': steps[0].tolist() if steps is not None else None,
        'bf16_dtypes': sorted({str(p.dtype) for p in bf16.parameters()}),
        'resaved_files': sorted(os.listdir('resaved_' + name)),
        'resaved_difference': (again_logits - output.logits).abs().max().item(),
        'pipeline_text': completion[0]['generated_text'], 'pipeline_ids': list(map(int, completion_ids)),
    }
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def workflow(halting_checkpoint, trained_checkpoints, sotu_indexed_dataset, tmp_path_factory):
    """Ours (logits, latent steps and halting shares on held-out text, greedy completion) and
    transformers' results on the sharded exports of the halting and vanilla checkpoints."""
    from megatron_lcot.hf.export import export
    from megatron_lcot.inference.generation import generate
    from megatron_lcot.inference.loading import load_trained_model
    from megatron_lcot.inference.sampling import SamplingParams
    from megatron_lcot.inference.scoring import CheckpointScorer

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hf_workflow")
    ours, job = {}, {}
    for name, checkpoint in (("halting", halting_checkpoint), ("vanilla", trained_checkpoints["vanilla"])):
        directory = str(root / name)
        result = export(checkpoint, directory, max_shard_size=SHARD_BYTES)
        trained = load_trained_model(checkpoint)
        ids = held_out_ids(sotu_indexed_dataset, trained.tokenizer.tokenize, WINDOW)
        log_probs, steps = CheckpointScorer(trained)(torch.tensor([ids]))
        with torch.no_grad():
            logits = trained.model(torch.tensor([ids]), torch.arange(WINDOW)[None]).logits[
                0, :, : trained.vocab_size
            ]
        completion = generate(trained, [PROMPT], NEW_TOKENS, SamplingParams(greedy=True))
        ours[name] = {
            "ids": ids,
            "logits": logits,
            "log_probs": log_probs,
            "latent_steps": steps.tolist(),
            "export": result,
            "text": completion.texts[0],
            "completion": trained.tokenizer.tokenize(PROMPT) + completion.tokens[0],
            "shares": halting_shares(trained, ids),
            "card": open(os.path.join(directory, "README.md"), encoding="utf-8").read(),
        }
        job[name] = {"dir": directory, "ids": ids, "prompt": PROMPT, "new_tokens": NEW_TOKENS}
    work = root / "hf_side"
    work.mkdir()
    (work / "job.json").write_text(json.dumps(job))
    theirs = run_without_megatron(_HF_SIDE, work)
    for name in job:
        theirs[name].update(torch.load(work / f"{name}_logits.pt"))
    return ours, theirs


def test_the_checkpoint_halts_before_k(workflow):
    ours, _ = workflow
    shares = ours["halting"]["shares"]
    print(f"halting export: shares of held-out tokens by latent steps 0..3 = {shares}")
    assert sum(shares[:-1]) >= 0.3 and min(shares) > 0


@pytest.mark.parametrize("name", ["halting", "vanilla"])
def test_sharded_export_follows_the_index_format_and_loads(workflow, name):
    ours, theirs = workflow
    result = theirs[name]
    shards = [f for f in result["files"] if f.endswith(".safetensors")]
    assert ours[name]["export"]["shards"] == len(shards) > 1
    assert "model.safetensors" not in result["files"]
    assert all(f.startswith("model-") and f.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards)
    assert result["weight_map"] == result["stored"]  # every tensor listed once, in the shard holding it
    assert result["index_metadata"]["total_size"] == result["stored_bytes"]
    difference = (ours[name]["logits"] - result["logits"][0]).abs().max().item()
    print(f"{name}: {len(shards)} shards, max |logit difference| vs ours = {difference:.3g}")
    assert difference < 1e-4


def test_exported_halting_equals_our_scorer(workflow):
    ours, theirs = workflow
    assert theirs["halting"]["latent_steps"] == ours["halting"]["latent_steps"]
    assert len(set(ours["halting"]["latent_steps"])) == 4
    their_log_probs = torch.log_softmax(theirs["halting"]["logits"][0].float(), -1)
    assert (their_log_probs - ours["halting"]["log_probs"]).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["halting", "vanilla"])
def test_pipeline_text_generation_gives_our_greedy_completion(workflow, name):
    """The tokens always; the text where it is valid UTF-8 (on invalid byte-fallback sequences
    SentencePiece and the tokenizers library place their U+FFFD differently)."""
    ours, theirs = workflow
    assert theirs[name]["pipeline_ids"] == ours[name]["completion"]
    assert len(ours[name]["completion"]) > len(PROMPT.split())
    if "\ufffd" not in theirs[name]["pipeline_text"]:
        assert theirs[name]["pipeline_text"] == PROMPT + ours[name]["text"]


@pytest.mark.parametrize("name", ["halting", "vanilla"])
def test_bf16_load_and_save_pretrained_reload(workflow, name):
    _, theirs = workflow
    result = theirs[name]
    assert result["bf16_dtypes"] == ["torch.bfloat16"]
    scale = result["logits"].abs().max().item()
    bf16_difference = (result["bf16"] - result["logits"]).abs().max().item()
    print(f"{name}: bf16 vs fp32 max |logit difference| = {bf16_difference:.3g} (max |logit| {scale:.3g})")
    assert bf16_difference < 0.05 * scale
    assert result["resaved_difference"] == 0.0
    if name == "halting":  # the remote code travels with the re-saved model
        assert {"configuration_lcot.py", "modeling_lcot.py"} <= set(result["resaved_files"])


def test_imported_halting_export_gives_our_scorer(workflow, halting_checkpoint, tmp_path):
    import argparse

    from megatron_lcot.hf.import_llama import import_llama
    from megatron_lcot.inference.loading import load_trained_model
    from megatron_lcot.inference.scoring import CheckpointScorer

    ours, _ = workflow
    options = argparse.Namespace(
        latent_steps=None,
        latent_layout=None,
        halting=None,
        halting_threshold=None,
        seq_length=64,
        target_tensor_parallel_size=1,
        target_pipeline_model_parallel_size=1,
    )
    import_llama(ours["halting"]["export"]["output"], str(tmp_path / "back"), options)
    back = load_trained_model(str(tmp_path / "back"))
    log_probs, steps = CheckpointScorer(back)(torch.tensor([ours["halting"]["ids"]]))
    assert steps.tolist() == ours["halting"]["latent_steps"]
    assert torch.equal(log_probs, ours["halting"]["log_probs"])
    original = load_trained_model(halting_checkpoint).model.state_dict()
    assert torch.equal(back.model.halting_router.weight, original["halting_router.weight"])


def test_model_card_states_the_checkpoint(workflow):
    ours, _ = workflow
    card = ours["halting"]["card"]
    for phrase in (
        "pipeline_tag: text-generation",
        "| latent steps K | 3 |",
        "3 latent thoughts per token, stepwise layout, adaptive halting",
        "threshold tau 0.4, loss weight 0.1, warm-up 0 iterations",
        "| training tokens | not recorded (a weights-only checkpoint) |",
        "trust_remote_code=True",
        'pipeline("text-generation"',
    ):
        assert phrase in card, phrase
    assert "| halting recipe | none |" in ours["vanilla"]["card"]
    assert "trust_remote_code" not in ours["vanilla"]["card"]


def test_model_card_takes_tokens_flops_and_perplexity_from_the_run(trained_checkpoints, tmp_path):
    from megatron_lcot.hf.export import export
    from megatron_lcot.inference.loading import load_trained_model
    from megatron_lcot.model.flops import training_flops_per_token

    checkpoint = trained_checkpoints["stepwise"]  # 6 iterations of 4 sequences of 64 tokens
    metrics = tmp_path / "metrics.jsonl"
    records = [{"split": "train", "iteration": 6, "loss": 5.0}] + [
        {"split": "valid", "iteration": it, "lm_loss": loss, "ppl": ppl, "final": False}
        for it, loss, ppl in ((3, 6.1, 445.86), (6, 5.9, 365.04), (9, 5.5, 244.69))
    ]  # 9: after the export's
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    export(checkpoint, str(tmp_path / "from_metrics"), metrics_file=str(metrics))
    card = (tmp_path / "from_metrics" / "README.md").read_text()
    trained = load_trained_model(checkpoint)
    flops = (
        training_flops_per_token(trained.model.config, 64, trained.config.model.padded_vocab_size)
        * 6
        * 4
        * 64
    )
    assert "| training tokens | 1,536 (24 sequences of 64) |" in card
    assert f"| training FLOPs | {flops:.4g} |" in card
    assert "| held-out perplexity | 365 (validation split at iteration 6, lm loss 5.9000) |" in card
    assert "| halting recipe | none |" in card and "2 latent thoughts per token" in card

    evaluation = tmp_path / "eval.json"
    evaluation.write_text(
        "[evaluate] progress\n"
        + json.dumps({"perplexity": 412.25, "tokens": 1023, "seq_length": 64, "stride": 64})
        + "\n"
    )
    export(checkpoint, str(tmp_path / "from_eval"), metrics_file=str(metrics), eval_result=str(evaluation))
    card = (tmp_path / "from_eval" / "README.md").read_text()
    assert (
        "| held-out perplexity | 412.2 (tools/evaluate.py: 1023 held-out tokens, windows of 64, stride 64) |"
        in card
    )


def test_bad_shard_size_and_eval_result_fail_before_writing(trained_checkpoints, tmp_path, capsys):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
    from convert_checkpoint import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "to-hf",
                "--load",
                trained_checkpoints["vanilla"],
                "--output",
                str(tmp_path / "out"),
                "--max-shard-size",
                "5XB",
            ]
        )
    assert exit_info.value.code == 2 and "--max-shard-size: '5XB' is not a size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "to-hf",
                "--load",
                trained_checkpoints["vanilla"],
                "--output",
                str(tmp_path / "out"),
                "--eval-result",
                str(tmp_path / "missing.json"),
            ]
        )
    assert exit_info.value.code == 2 and "--eval-result" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")
