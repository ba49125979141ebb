"""The latent KV cache of the exported model (`modeling_lcot.LcotLatentCache`), fp32, CPU.

On checkpoints trained a few steps on real text, and on `halting_checkpoint` (tokens halt after
every count of latent steps 0..K): transformers' `generate(use_cache=True)` must give the tokens
of `use_cache=False` with logits within 1e-5, every forward after the prefill must receive only
the new token, and the cached logits must equal our own decoder's.
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.hf_fixtures import halting_shares, held_out_ids


def test_halting_checkpoint_halts_at_every_step_count(
    halting_checkpoint, trained_checkpoints, sotu_indexed_dataset
):
    from megatron_lcot.inference.loading import load_trained_model

    torch.set_num_threads(1)
    trained = load_trained_model(halting_checkpoint)
    ids = held_out_ids(sotu_indexed_dataset, trained.tokenizer.tokenize, 512)
    shares = halting_shares(trained, ids)
    print(f"halting_checkpoint: shares of tokens by executed latent steps 0..3 = {shares}")
    assert len(shares) == 4 and min(shares) >= 0.05  # every step count occurs
    assert sum(shares[:-1]) >= 0.3  # at least 30% of the tokens halt before step K
    untouched = halting_shares(load_trained_model(trained_checkpoints["adaptive"]), ids)
    assert untouched[-1] == 1.0  # six training steps alone: no token halts at tau 0.4


PROMPTS = ["The Congress of the United States", "War", "In the year that has passed since my last message"]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def exports(trained_checkpoints, halting_checkpoint, tmp_path_factory) -> dict:
    """{mode: exported directory}: vanilla, stepwise K=2, interleaved K=1 trained 6 steps, and
    adaptive = `halting_checkpoint` (K=3, tokens halting after 0..3 steps)."""
    from megatron_lcot.hf.export import export

    root = tmp_path_factory.mktemp("hf_cache_exports")
    sources = {**trained_checkpoints, "adaptive": halting_checkpoint}
    for mode, checkpoint in sources.items():
        export(checkpoint, str(root / mode))
    return {mode: str(root / mode) for mode in sources}


def _hf_model(directory):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()


def _prompt_ids(directory, prompts):
    """Left-padded ids [b, L] and attention mask of `prompts`, tokenized as training data."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    length = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


class ForwardLog:
    """Per forward of the model: how many tokens it received, the query lengths of every pass
    of the first decoder layer's attention, and the output's latent steps of the last token."""

    def __init__(self, model):
        self.calls = []
        model.register_forward_pre_hook(self._start, with_kwargs=True)
        model.register_forward_hook(self._end)
        model.model.layers[0].self_attn.register_forward_pre_hook(self._attention, with_kwargs=True)

    def _start(self, module, args, kwargs):
        self.calls.append({"tokens": kwargs["input_ids"].shape[1], "queries": []})

    def _attention(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.calls[-1]["queries"].append(hidden.shape[1])

    def _end(self, module, args, output):
        steps = getattr(output, "latent_steps", None)
        self.calls[-1]["latent_steps"] = None if steps is None else steps[:, -1].tolist()


def _generate(model, ids, mask, use_cache, new_tokens=NEW_TOKENS, **options):
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=use_cache,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            **options,
        )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("mode", ["vanilla", "stepwise", "adaptive", "interleaved"])
def test_cached_generate_equals_uncached(exports, mode):
    model = _hf_model(exports[mode])
    ids, mask = _prompt_ids(exports[mode], PROMPTS[:1])
    log = ForwardLog(model)
    cached_tokens, cached_logits = _generate(model, ids, mask, use_cache=True)
    calls = log.calls
    log.calls = []
    tokens, logits = _generate(model, ids, mask, use_cache=False)
    difference = (cached_logits - logits).abs().max().item()
    same = torch.equal(cached_tokens, tokens)
    print(
        f"{mode}: {NEW_TOKENS} new tokens, cached == uncached tokens: {same}, "
        f"max |logit difference| {difference:.3g}"
    )
    assert torch.equal(cached_tokens, tokens)
    assert difference < 1e-5
    # the prefill gets the prompt; every later forward only the newest token, and each of its
    # passes only that token's slot
    assert [c["tokens"] for c in calls] == [ids.shape[1]] + [1] * (NEW_TOKENS - 1)
    assert all(q == 1 for c in calls[1:] for q in c["queries"])
    slots = getattr(model.config, "latent_steps", 0) + 1
    assert all(1 <= len(c["queries"]) <= slots for c in calls[1:])
    assert [c["tokens"] for c in log.calls] == list(range(ids.shape[1], ids.shape[1] + NEW_TOKENS))
    if mode == "adaptive":  # generation exercised halting at every step count, passes were skipped
        steps = [c["latent_steps"][0] for c in calls]
        assert set(steps) == {0.0, 1.0, 2.0, 3.0}
        assert [len(c["queries"]) for c in calls[1:]] == [min(int(s) + 1, slots) for s in steps[1:]]


@pytest.mark.parametrize("mode", ["stepwise", "adaptive", "interleaved"])
def test_cached_generate_equals_our_decoder(exports, trained_checkpoints, halting_checkpoint, mode):
    from megatron_lcot.inference.generation import generate_ids
    from megatron_lcot.inference.loading import load_trained_model
    from megatron_lcot.inference.sampling import SamplingParams

    checkpoint = halting_checkpoint if mode == "adaptive" else trained_checkpoints[mode]
    trained = load_trained_model(checkpoint)
    ids, mask = _prompt_ids(exports[mode], PROMPTS[2:])
    ours = generate_ids(
        trained, [ids[0].tolist()], 32, SamplingParams(greedy=True), keep_logits=True, stop_at_eod=False
    )
    model = _hf_model(exports[mode])
    log = ForwardLog(model)
    tokens, logits = _generate(model, ids, mask, use_cache=True, new_tokens=32)
    difference = (logits[0] - ours.step_logits[0]).abs().max().item()
    print(f"{mode}: transformers cached vs our decoder, 32 tokens: max |logit difference| {difference:.3g}")
    assert tokens[0].tolist() == ours.tokens[0]
    assert difference < 1e-4
    assert [c["latent_steps"][0] for c in log.calls] == ours.latent_steps[0]


@pytest.mark.parametrize("mode", ["adaptive", "interleaved"])
def test_left_padded_batch_equals_one_at_a_time(exports, mode):
    model = _hf_model(exports[mode])
    ids, mask = _prompt_ids(exports[mode], PROMPTS)
    assert (mask == 0).any()  # the batch is left-padded
    batched, batched_logits = _generate(model, ids, mask, use_cache=True, new_tokens=16)
    for row, prompt in enumerate(PROMPTS):
        alone_ids, alone_mask = _prompt_ids(exports[mode], [prompt])
        alone, alone_logits = _generate(model, alone_ids, alone_mask, use_cache=True, new_tokens=16)
        assert torch.equal(batched[row], alone[0])
        assert (batched_logits[row] - alone_logits[0]).abs().max().item() < 1e-5


def test_beam_search_with_cache_equals_without(exports):
    model = _hf_model(exports["adaptive"])
    ids, mask = _prompt_ids(exports["adaptive"], PROMPTS[:2])
    runs = [
        _generate(model, ids, mask, use_cache=use_cache, new_tokens=12, num_beams=3)[0]
        for use_cache in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])


def test_foreign_caches_are_refused(exports):
    from transformers import DynamicCache

    model = _hf_model(exports["adaptive"])
    ids, mask = _prompt_ids(exports["adaptive"], PROMPTS[:1])
    with pytest.raises(ValueError, match="cache=DynamicCache: this model caches every latent step"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, cache=DynamicCache())
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, cache_implementation="static")
    with pytest.raises(TypeError, match="past_key_values: transformers now names it cache"):
        model(ids, past_key_values=None)


@pytest.mark.slow
@pytest.mark.parametrize("mode, prompt_tokens, new_tokens", [("adaptive", 960, 64), ("interleaved", 240, 16)])
def test_long_prompt_cached_equals_uncached(exports, sotu_indexed_dataset, mode, prompt_tokens, new_tokens):
    """Prompts far beyond the training length (64). The interleaved uncached reference iterates
    Jacobi to its fixed point over the whole sequence per token, hence its smaller sizes."""
    from transformers import AutoTokenizer

    model = _hf_model(exports[mode])
    tokenizer = AutoTokenizer.from_pretrained(exports[mode], trust_remote_code=True)
    prompt = held_out_ids(
        sotu_indexed_dataset,
        lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
        prompt_tokens,
    )
    ids = torch.tensor([prompt])
    cached, cached_logits = _generate(model, ids, torch.ones_like(ids), use_cache=True, new_tokens=new_tokens)
    full, full_logits = _generate(model, ids, torch.ones_like(ids), use_cache=False, new_tokens=new_tokens)
    difference = (cached_logits - full_logits).abs().max().item()
    print(f"{mode}: {prompt_tokens}-token prompt + {new_tokens}: max |logit difference| {difference:.3g}")
    assert torch.equal(cached, full)
    assert difference < 1e-5


@pytest.mark.slow
def test_decode_benchmark_runs(trained_checkpoints):
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT, tool_env

    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO_ROOT, "benchmarks", "hf_decode.py"),
            "--load",
            trained_checkpoints["adaptive"],
            "--decisive-router",
            "--totals",
            "24",
            "96",
            "--new-tokens",
            "4",
            "--repeats",
            "1",
        ],
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert {(r["decoder"], r["total_positions"]) for r in lines[:-1]} == {
        (d, t) for d in ("hf_cached", "hf_uncached", "ours") for t in (24, 96)
    }
    assert set(lines[-1]["per_token_time_ratio_96_vs_24"]) == {"hf_cached", "hf_uncached", "ours"}
