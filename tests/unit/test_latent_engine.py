"""The one latent engine (model/engine.py) through a schedule swapped in by the spec.

`ResidualThoughtSchedule` (tests/distributed/residual_schedule.py) overrides one hook of the
stepwise schedule (pass k >= 1 reads the previous output plus the token embedding). These tests
prove it runs unchanged in single-stage training (against a naive token-by-token reference
written here) and in cached decoding (against the full forward, with tokens halting at different
steps); tests/distributed/test_pipeline_equivalence.py runs it across pipeline stages.
"""

from __future__ import annotations

import torch

from tests.distributed.residual_schedule import ResidualThoughtSchedule
from tests.reference import naive_lm as ref
from tests.reference.helpers import init_megatron, max_abs, randomize_norm_weights, single_thread_fixture
from tests.unit.test_equivalence_model import MAX_LEN, SEED, VOCAB, lcot_config

_single_thread = single_thread_fixture()


def residual_model(**fields):
    from megatron.core.transformer.spec_utils import build_module

    from megatron_lcot.model import get_lcot_model_spec

    config = lcot_config(**fields)
    init_megatron(SEED)
    spec = get_lcot_model_spec(config, use_te=False)
    spec.submodules.latent_schedule = ResidualThoughtSchedule
    model = build_module(spec, config=config, vocab_size=VOCAB, max_sequence_length=MAX_LEN)
    randomize_norm_weights(model, SEED)
    return model.eval()


def naive_residual_logits(w, tokens: torch.Tensor, K: int, scale: float) -> torch.Tensor:
    """Token by token, step by step: slot (t,k) sees (t',k') iff t' <= t and k' <= k, and its
    input is the token embedding (k = 0) or the previous step's output plus it."""
    out = []
    for seq in tokens.tolist():
        decoder, outputs = ref.SlotDecoder(w), []
        for t, token in enumerate(seq):
            embedding = w.word_embeddings[token] * scale
            x = embedding
            for k in range(K + 1):
                y = decoder.run(x, t, (t, k), [(u, j) for u in range(t + 1) for j in range(k + 1)])
                x = y + embedding
            outputs.append(y)
        out.append(ref.head(w, torch.stack(outputs)))
    return torch.stack(out)


def test_custom_schedule_trains_single_stage_as_the_naive_reference():
    K, batch, tokens = 2, 2, 10
    model = residual_model(latent_steps=K)
    assert isinstance(model.latent_schedule, ResidualThoughtSchedule)
    ids = torch.randint(0, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(ids, torch.arange(tokens).expand(batch, tokens)).logits
        want = naive_residual_logits(ref.NaiveWeights.from_model(model), ids, K, model.config.embedding_scale)
        plain = ref.stepwise_logits(ref.NaiveWeights.from_model(model), ids, K, model.config.embedding_scale)
    assert max_abs(logits, want) < 1e-4
    assert max_abs(logits, plain) > 1e-2  # the custom hook really changed what the passes compute


def test_custom_schedule_decodes_with_the_cache_as_its_full_forward():
    """Prefill of a left-padded batch, then one token at a time, against the full forward of each
    prefix: the schedule's passes over a persisting store, halting at different steps."""
    from megatron_lcot.inference.decoding import LatentDecoder
    from megatron_lcot.model.engine import LatentKVStore

    K = 3
    model = residual_model(latent_steps=K, halting="adaptive", halting_threshold=0.4)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(11)
        model.halting_router.weight.copy_(0.6 * torch.randn(model.halting_router.weight.shape, generator=gen))
        model.halting_router.bias.fill_(0.5)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    prompt = 6
    valid = torch.ones(2, prompt, dtype=torch.bool)
    valid[1, :2] = False  # sequence 1 is a 4-token prompt, left-padded
    decoder, cache = LatentDecoder(model), LatentKVStore()
    steps_seen = set()
    with torch.no_grad():
        logits, steps = decoder(cache, ids[:, :prompt], valid)
        for t in range(prompt, ids.shape[1] + 1):
            for row, start in ((0, 0), (1, 2)):
                prefix = ids[row : row + 1, start:t]
                full = model(prefix, torch.arange(prefix.shape[1])[None]).logits[0, -1]
                assert max_abs(logits[row, -1], full) < 1e-4, (t, row)
            steps_seen.update((steps[valid] if t == prompt else steps.flatten()).tolist())
            if t < ids.shape[1]:
                logits, steps = decoder(cache, ids[:, t : t + 1])
    assert len(steps_seen) >= 3, f"the fixture should halt tokens at several steps: {steps_seen}"
