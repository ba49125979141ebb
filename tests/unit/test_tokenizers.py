"""The shared tokenizer abstraction against the libraries it wraps and an independent GPT-2 BPE."""

from __future__ import annotations

import json
import pickle

import pytest
import regex
import sentencepiece
import tokenizers

from megatron_lcot.data.tokenizer_training import train_sentencepiece
from megatron_lcot.data.tokenizers import TokenizerError, build_tokenizer
from tests.unit.preprocess_helpers import sotu_texts

SAMPLE = sotu_texts(3, start=200) + ["Ünïcödé — “quotes” 中文 emoji 🎉\n\n  indented\ttabs", "x"]


def _gpt2_reference(vocab_path: str, merges_path: str):
    """GPT-2's published encoder.py algorithm, written out independently of ``tokenizers``."""
    encoder = json.load(open(vocab_path, encoding="utf-8"))
    merges = [
        tuple(line.split()) for line in open(merges_path, encoding="utf-8").read().split("\n")[1:] if line
    ]
    ranks = {pair: i for i, pair in enumerate(merges)}
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    byte_encoder = dict(zip(printable, map(chr, chars)))
    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def bpe(token: str) -> list[str]:
        word = list(token)
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(text: str) -> list[int]:
        return [
            encoder[piece]
            for tok in pattern.findall(text)
            for piece in bpe("".join(byte_encoder[b] for b in tok.encode("utf-8")))
        ]

    return encode


def test_sentencepiece_matches_library_and_has_real_eod(trained_tokenizers):
    tok = build_tokenizer("SentencePieceTokenizer", trained_tokenizers["sp"])
    library = sentencepiece.SentencePieceProcessor(model_file=trained_tokenizers["sp"])
    assert tok.tokenize_batch(SAMPLE) == [library.encode(t) for t in SAMPLE]
    assert [tok.tokenize(t) for t in SAMPLE] == [library.encode(t) for t in SAMPLE]
    assert tok.eod == library.piece_to_id("</s>") == 2
    assert tok.vocab_size == 2000
    assert tok.detokenize(tok.tokenize(SAMPLE[0])) == library.decode(library.encode(SAMPLE[0]))


def test_huggingface_tokenizer_json_matches_library(trained_tokenizers):
    tok = build_tokenizer("HuggingFaceTokenizer", trained_tokenizers["hf"])
    library = tokenizers.Tokenizer.from_file(trained_tokenizers["hf"])
    assert tok.tokenize_batch(SAMPLE) == [library.encode(t, add_special_tokens=False).ids for t in SAMPLE]
    assert tok.eod == library.token_to_id("<|endoftext|>")
    assert tok.detokenize(tok.tokenize(SAMPLE[3])) == SAMPLE[3]  # byte-level BPE is lossless


def test_gpt2_bpe_vocab_merges_matches_independent_reference(trained_tokenizers):
    tok = build_tokenizer(
        "GPT2BPETokenizer", vocab_file=trained_tokenizers["vocab"], merge_file=trained_tokenizers["merges"]
    )
    reference = _gpt2_reference(trained_tokenizers["vocab"], trained_tokenizers["merges"])
    for text in SAMPLE:
        assert tok.tokenize(text) == reference(text)
    assert tok.tokenize_batch(SAMPLE) == [reference(t) for t in SAMPLE]
    assert tok.tokenize("a <|endoftext|> b") != tok.tokenize("a ") + [tok.eod] + tok.tokenize(
        " b"
    )  # literal text, not eod
    assert tok.detokenize(tok.tokenize(SAMPLE[3])) == SAMPLE[3]


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert tok.tokenize("5 17 99") == [5, 17, 99]
    assert tok.eod == 100 and tok.vocab_size == 101
    with pytest.raises(ValueError):
        tok.tokenize("100")


def test_pickles_by_construction_for_worker_processes(trained_tokenizers):
    tok = build_tokenizer("SentencePieceTokenizer", trained_tokenizers["sp"])
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.tokenize(SAMPLE[0]) == tok.tokenize(SAMPLE[0])
    assert copy.unique_identifiers == tok.unique_identifiers


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tokenizer_type="BertWordPiece"), "--tokenizer-type 'BertWordPiece' is not supported"),
        (dict(tokenizer_type="SentencePieceTokenizer"), "--tokenizer-model is required"),
        (
            dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model="/nonexistent.model"),
            "--tokenizer-model '/nonexistent.model': no such file",
        ),
        (dict(tokenizer_type="GPT2BPETokenizer", merge_file="m.txt"), "--vocab-file is required"),
        (dict(tokenizer_type="NullTokenizer"), "--vocab-size is required"),
    ],
)
def test_configuration_errors_name_the_flag(kwargs, message):
    with pytest.raises(TokenizerError, match=regex.escape(message)):
        build_tokenizer(**kwargs)


def test_wrong_file_kind_is_a_clear_error(trained_tokenizers):
    with pytest.raises(TokenizerError, match="not a sentencepiece model.*HuggingFaceTokenizer"):
        build_tokenizer("SentencePieceTokenizer", trained_tokenizers["hf"])
    with pytest.raises(TokenizerError, match="not a Hugging Face tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", trained_tokenizers["sp"])


def test_unigram_training_has_eos_as_eod(tmp_path):
    model = train_sentencepiece(sotu_texts(5), str(tmp_path / "uni"), vocab_size=600, model_type="unigram")
    tok = build_tokenizer("SentencePieceTokenizer", model)
    assert sentencepiece.SentencePieceProcessor(model_file=model).id_to_piece(tok.eod) == "</s>"
    assert tok.tokenize(SAMPLE[0]) == sentencepiece.SentencePieceProcessor(model_file=model).encode(SAMPLE[0])


def test_accepted_by_megatron_core_mock_gpt_dataset(trained_tokenizers):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset

    tok = build_tokenizer("SentencePieceTokenizer", trained_tokenizers["sp"])
    config = GPTDatasetConfig(
        random_seed=1,
        sequence_length=32,
        tokenizer=tok,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=True,
        split="1,0,0",
        mid_level_dataset_surplus=0.005,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(MockGPTDataset, [8, None, None], lambda: True, config).build()
    sample = train[0]
    assert sample["tokens"].shape == (32,)
    assert int(sample["tokens"].max()) < tok.vocab_size
    eod_positions = sample["tokens"] == tok.eod
    assert bool((sample["loss_mask"][eod_positions] == 0).all())  # eod_mask_loss used our eod id


def test_real_gpt2_from_tiktoken_ranks(tmp_path):
    """GPT-2's real ranks (whisper's gpt2.tiktoken) -> vocab.json + merges.txt -> GPT2BPETokenizer."""
    import os

    from megatron_lcot.data.tiktoken_convert import tiktoken_to_gpt2_files

    ranks = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "gpt2.tiktoken.gz")
    vocab, merges = tiktoken_to_gpt2_files(ranks, str(tmp_path))
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    assert tok.tokenize("Hello world") == [15496, 995]  # GPT-2's published ids
    assert tok.tokenize(" The quick brown fox") == [383, 2068, 7586, 21831]
    assert tok.eod == 50256 and tok.vocab_size == 50257
    reference = _gpt2_reference(vocab, merges)
    assert tok.tokenize_batch(SAMPLE[2:]) == [reference(t) for t in SAMPLE[2:]]
