"""Datasets made by the tool blend in megatron-core in the configured proportions
(what ``--data-path 0.7 a_text_document 0.3 b_text_document`` builds in training)."""

from __future__ import annotations

import numpy as np

from megatron_lcot.data.tokenizers import build_tokenizer
from tests.unit.preprocess_helpers import run, write_jsonl

NULL = {"tokenizer_type": "NullTokenizer", "vocab_size": 100}


def _null_corpus(path, low: int, high: int, documents: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return write_jsonl(
        path,
        [
            {"text": " ".join(map(str, rng.integers(low, high, rng.integers(5, 40))))}
            for _ in range(documents)
        ],
    )


def test_blend_reads_sources_in_configured_proportions(tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    # Source a holds ids 0..49, source b ids 50..99: every sample tells where it came from.
    run([_null_corpus(tmp_path / "a.jsonl", 0, 50, 400, 0)], tmp_path / "a", NULL, append_eod=True, workers=2)
    run(
        [_null_corpus(tmp_path / "b.jsonl", 50, 100, 400, 1)],
        tmp_path / "b",
        NULL,
        append_eod=True,
        workers=2,
    )
    tokenizer = build_tokenizer(**NULL)
    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=16,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        split="1,0,0",
        blend=([str(tmp_path / "a_text_document"), str(tmp_path / "b_text_document")], [0.7, 0.3]),
    )
    samples = 2000
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [samples, 0, 0], lambda: True, config).build()
    from_a = 0
    for i in range(samples):
        tokens = train[i]["tokens"].numpy()
        text = tokens[tokens != tokenizer.eod]
        assert (text < 50).all() or (text >= 50).all()  # a sample never mixes sources
        from_a += bool((text < 50).all())
    assert abs(from_a / samples - 0.7) < 0.02
