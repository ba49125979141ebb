"""tools/analyze_halting.py on real checkpoints: per-token records equal the model's own loss
path, the summary's statistics follow from the records, the plots and HTML are written; and
Spearman's correlation with ties against a hand count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT, TINY_MODEL_FLAGS, corpus_flags, run_pretrain, tool_env

TOOL = os.path.join(REPO_ROOT, "tools", "analyze_halting.py")


def test_spearman_with_ties_matches_hand_count():
    sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
    from analyze_halting import hardest_quintile_share, spearman, steps_by_decile

    # x ranks (ties averaged): [1.5, 1.5, 3, 4]; y ranks: [1, 2, 4, 3]  -> Pearson of the ranks
    x, y = torch.tensor([0.0, 0.0, 1.0, 2.0]), torch.tensor([0.1, 0.5, 0.9, 0.7])
    rx, ry = torch.tensor([1.5, 1.5, 3, 4]) - 2.5, torch.tensor([1.0, 2, 4, 3]) - 2.5
    assert spearman(x, y) == pytest.approx(float(rx @ ry / (rx.norm() * ry.norm())))
    assert spearman(x, -y) == pytest.approx(-spearman(x, y))
    assert spearman(torch.zeros(4), y) is None  # constant steps: no correlation, valid JSON
    steps = torch.arange(20) % 3
    assert steps_by_decile(steps, -steps.float())[0] == 2.0  # NLL = -steps: the easiest decile ran 2 steps
    # 10 tokens, steps 0..9 (45 in all); the hardest fifth by NLL: the tokens with steps 9 and 0
    steps, nll = torch.arange(10), torch.tensor([9.0, 1, 2, 3, 4, 5, 6, 7, 8, 10])
    assert hardest_quintile_share(steps, nll) == pytest.approx(9 / 45)
    assert hardest_quintile_share(steps, steps.float()) == pytest.approx((9 + 8) / 45)
    assert hardest_quintile_share(torch.zeros(10), nll) is None


def _train(tmp_path, dataset, name, *extra):
    flags = [
        *TINY_MODEL_FLAGS,
        *corpus_flags(dataset, tmp_path),
        "--micro-batch-size",
        "4",
        "--train-iters",
        "6",
        "--lr",
        "1e-2",
        "--eval-iters",
        "1",
        "--eval-interval",
        "100",
        "--log-interval",
        "3",
        "--save",
        str(tmp_path / name),
        *map(str, extra),
    ]
    result = run_pretrain(flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / name


@pytest.mark.slow  # two tiny trainings and three model loads: ~1 min on a quiet CPU
def test_analyze_halting_records_match_the_model(tmp_path, sotu_indexed_dataset):
    adaptive = _train(
        tmp_path,
        sotu_indexed_dataset,
        "adaptive",
        "--latent-steps",
        2,
        "--halting",
        "adaptive",
        "--halting-threshold",
        0.8,
    )
    vanilla = _train(tmp_path, sotu_indexed_dataset, "vanilla", "--latent-steps", 0)
    text = tmp_path / "input.txt"
    from tests.conftest import sotu_speeches

    text.write_text(sotu_speeches(45)[-1][:3000], encoding="utf-8")  # an address not trained on
    out = tmp_path / "analysis"
    env = tool_env()
    result = subprocess.run(
        [
            sys.executable,
            TOOL,
            "--load",
            adaptive,
            "--reference",
            vanilla,
            "--input",
            text,
            "--output",
            out,
            "--max-tokens",
            "300",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(records) == summary["tokens"] == 300
    for name in ("steps_histogram.png", "steps_by_nll_decile.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "sample.html").read_text().count("<span title=") == 300

    # Independent recomputation: the model's own loss path (labels -> per-token CE and executed
    # steps) for the adaptive model and the reference, and step 0 as a plain causal pass.
    from megatron_lcot.inference.loading import load_trained_model

    trained, reference = load_trained_model(str(adaptive)), load_trained_model(str(vanilla))
    stream = [*trained.tokenizer.tokenize(text.read_text(encoding="utf-8")), trained.tokenizer.eod][:301]
    seq = trained.config.model.seq_length
    nll, ref_nll, steps, first = [], [], [], []
    with torch.no_grad():
        for begin in range(0, 300, seq):
            window = torch.tensor(stream[begin : begin + seq + 1])
            ids, labels = window[None, :-1], window[None, 1:]
            positions = torch.arange(ids.shape[1])[None]
            output = trained.model(ids, positions, labels=labels)
            nll.append(output.lm_loss[0])
            steps.append(output.latent_steps[0])
            ref_nll.append(reference.model(ids, positions, labels=labels).lm_loss[0])
            model = trained.model
            states = model.embedding(input_ids=ids, position_ids=positions) * model.config.embedding_scale
            step0 = model.decoder(
                hidden_states=states, attention_mask=None, rotary_pos_emb=model.rotary_pos_emb(ids.shape[1])
            )
            logits = model.output_layer(step0)[0][:, 0]
            first.append(-torch.log_softmax(logits, -1).gather(-1, labels[0][:, None])[:, 0])
    expected = {
        "nll": torch.cat(nll),
        "reference_nll": torch.cat(ref_nll),
        "first_step_nll": torch.cat(first),
        "latent_steps": torch.cat(steps),
    }
    for key, values in expected.items():
        got = torch.tensor([r[key] for r in records], dtype=torch.float64)
        assert (got - values.double()).abs().max() < 1e-4, key
    assert [r["token"] for r in records] == stream[1:301]
    shares = torch.bincount(expected["latent_steps"].long(), minlength=3).double() / 300
    assert summary["halted_share"] == pytest.approx(shares.tolist())
    assert len(set(int(s) for s in expected["latent_steps"].tolist())) >= 2, "fixture: halting did not vary"
    assert -1 <= summary["spearman_steps_vs_reference_nll"] <= 1
    assert -1 <= summary["spearman_steps_vs_first_step_nll"] <= 1

    refused = subprocess.run(
        [sys.executable, TOOL, "--load", vanilla, "--input", text, "--output", out],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2
    assert "analyze_halting.py: error: --load" in refused.stderr and "--halting adaptive" in refused.stderr
