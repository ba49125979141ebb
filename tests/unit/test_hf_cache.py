"""The latent KV cache of the exported model (`modeling_lcot.LcotLatentCache`), fp32, CPU.

On checkpoints trained a few steps on real text, and on `halting_checkpoint` (tokens halt after
every count of latent steps 0..K): transformers' `generate(use_cache=True)` must give the tokens
of `use_cache=False` with logits within 1e-5, every forward after the prefill must receive only
the new token, and the cached logits must equal our own decoder's.
"""

from __future__ import annotations

import torch

from tests.unit.hf_fixtures import (halting_checkpoint, halting_shares, held_out_ids,  # noqa: F401
                                    trained_checkpoints)


def test_halting_checkpoint_halts_at_every_step_count(halting_checkpoint, trained_checkpoints,  # noqa: F811
                                                      sotu_indexed_dataset):
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
