"""tools/generate.py and the generation API as users expect them: the repetition penalty is
transformers' (RepetitionPenaltyLogitsProcessor on the same logits), streamed text is the text of
the non-streaming result piece by piece as tokens come, stop strings cut the text and end the
sequence, and bad flags fail before the checkpoint is read, naming the flag. On the tiny
checkpoints of hf_fixtures (trained a few steps on State of the Union text), fp32, CPU."""

from __future__ import annotations

import pytest
import torch

PROMPTS = ["The Congress of the United States", "War", "In the year that has passed since my last message"]


@pytest.fixture(scope="module")
def stepwise(trained_checkpoints):
    from megatron_lcot.inference.loading import load_trained_model

    torch.set_num_threads(1)
    return load_trained_model(trained_checkpoints["stepwise"])


def test_repetition_penalty_equals_transformers_on_the_same_logits():
    from transformers import RepetitionPenaltyLogitsProcessor

    from megatron_lcot.inference.sampling import penalize_repetition

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=generator) * 4  # positive and negative entries
    sequences = torch.randint(0, 50, (3, 12), generator=generator)  # with repeats
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, sequences, True)
    for penalty in (1.3, 0.7):
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(sequences, logits.clone())
        assert torch.equal(penalize_repetition(logits, seen, penalty), theirs)
    assert not torch.equal(penalize_repetition(logits, seen, 1.3), logits)


def test_generation_applies_the_penalty_to_prompt_and_generated_ids(stepwise):
    """Every greedy choice under --repetition-penalty 0.5 (favouring repeats) is the argmax of
    transformers' processor applied to that step's logits with the whole sequence so far (prompt
    included)."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from megatron_lcot.inference.generation import generate_ids
    from megatron_lcot.inference.sampling import SamplingParams

    prompt = stepwise.tokenizer.tokenize(PROMPTS[0])
    plain = generate_ids(stepwise, [prompt], 16, SamplingParams(greedy=True), stop_at_eod=False)
    penalized = generate_ids(
        stepwise,
        [prompt],
        16,
        SamplingParams(temperature=0, repetition_penalty=0.5),
        keep_logits=True,
        stop_at_eod=False,
    )
    assert penalized.tokens != plain.tokens  # the penalty changes what is generated
    processor = RepetitionPenaltyLogitsProcessor(0.5)
    tokens = penalized.tokens[0]
    for step, logits in enumerate(penalized.step_logits[0]):
        so_far = torch.tensor([prompt + tokens[:step]])
        assert int(processor(so_far, logits[None].clone()).argmax()) == tokens[step]


def test_streamed_pieces_are_the_texts_as_tokens_come(stepwise):
    from megatron_lcot.inference.generation import generate
    from megatron_lcot.inference.sampling import SamplingParams

    decoded = []  # what the tokenizer last decoded: streamed text may only come from tokens already chosen
    detokenize = stepwise.tokenizer.detokenize
    stepwise.tokenizer.detokenize = lambda ids: decoded.append(detokenize(ids)) or decoded[-1]
    pieces = {row: [] for row in range(len(PROMPTS))}
    # the completion is decoded after the prompt's last token, whose text is then removed
    context = [detokenize(stepwise.tokenizer.tokenize(prompt)[-1:]) for prompt in PROMPTS]

    def on_text(row, piece):
        pieces[row].append(piece)
        assert decoded[-1][len(context[row]) :].startswith("".join(pieces[row]))

    try:
        sampling = SamplingParams(temperature=0.9, top_k=20, seed=3)
        streamed = generate(stepwise, PROMPTS, 20, sampling, on_text=on_text)
    finally:
        del stepwise.tokenizer.detokenize
    quiet = generate(stepwise, PROMPTS, 20, sampling)
    eod = stepwise.tokenizer.eod
    for row in range(len(PROMPTS)):
        assert streamed.tokens[row] == quiet.tokens[row]
        assert "".join(pieces[row]) == streamed.texts[row] == quiet.texts[row]
        prompt = stepwise.tokenizer.tokenize(PROMPTS[row])
        assert PROMPTS[row] + quiet.texts[row] == detokenize(
            prompt + [t for t in quiet.tokens[row] if t != eod]
        )
        assert len(pieces[row]) >= len(streamed.tokens[row]) // 2  # streamed, not handed out at the end


def test_stop_string_cuts_the_text_and_ends_the_sequence(stepwise):
    from megatron_lcot.inference.generation import generate
    from megatron_lcot.inference.sampling import SamplingParams

    greedy = SamplingParams(greedy=True)
    full = generate(stepwise, PROMPTS[:1], 24, greedy)
    text, tokens = full.texts[0], full.tokens[0]
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # a string first seen in the middle of the completion
    cut = text.find(stop)
    assert len(stop) == 3 and cut > 0
    pieces = []
    stopped = generate(
        stepwise,
        PROMPTS[:1],
        24,
        greedy,
        stop=("never appears", stop),
        on_text=lambda row, piece: pieces.append(piece),
    )
    assert stopped.texts[0] == "".join(pieces) == text[:cut]
    ended = stopped.tokens[0]  # ends with the token that completed the stop string
    assert ended == tokens[: len(ended)] and len(ended) < len(tokens)
    detokenize = stepwise.tokenizer.detokenize
    assert stop in detokenize(ended) and stop not in detokenize(ended[:-1])
    assert len(stopped.latent_steps[0]) == len(ended)


def test_stop_string_split_across_tokens_is_never_streamed():
    """A stop string that arrives over several tokens: its beginning is held back, not printed."""
    from megatron_lcot.inference.text_stream import TextStream

    pieces = {1: "Hello", 2: " wor", 3: "ld", 4: " and", 5: " more"}
    stream = TextStream(lambda ids: "".join(pieces[i] for i in ids), stop=("world",), eod=0)
    handed = [stream.push(token) for token in (1, 2, 3, 4)]
    assert handed == ["Hello", " ", "", ""] and stream.finished and stream.text == "Hello "
    stream = TextStream(lambda ids: "".join(pieces[i] for i in ids), stop=("world",), eod=0)
    handed = [stream.push(token) for token in (1, 4, 5)] + [stream.close()]
    assert "".join(handed) == "Hello and more" and not stream.finished


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top-p", "1.5"], "--top-p 1.5 must be in (0, 1]"),
        (["--temperature", "-1"], "--temperature -1.0 must be >= 0"),
        (["--repetition-penalty", "0"], "--repetition-penalty 0.0 must be > 0"),
        (["--top-k", "-2"], "--top-k -2 must be >= 0"),
        (["--stop", ""], "--stop '' is empty"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0 must be positive"),
    ],
)
def test_bad_flags_fail_before_the_checkpoint_is_read(tmp_path, capsys, flags, message):
    from tools.generate import main

    with pytest.raises(SystemExit) as exit_info:  # --load names no checkpoint: the flag is reported first
        main(["--load", str(tmp_path / "nowhere"), "--prompt", "War", *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("generate.py: error: ") and message in error, error


def test_unknown_flag_names_are_refused(tmp_path, capsys):
    from tools.generate import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--load", str(tmp_path), "--prompt", "War", "--top_p", "0.9"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --top_p" in capsys.readouterr().err
