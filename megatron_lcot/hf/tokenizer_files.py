"""The training tokenizer as Hugging Face files (`tokenizer.json` + `tokenizer_config.json`).

`AutoTokenizer.from_pretrained(DIR)` on the result yields exactly the ids training used:

* SentencePiece: converted with transformers' `SpmConverter.build_tokenizer_from_spm_proto`,
  which follows the model's own normaliser (NFKC charsmap, extra-whitespace removal, dummy
  prefix) and byte fallback, so `encode` matches `SentencePieceProcessor.encode` (newlines,
  runs of spaces and unknown characters included; tested on real text);
* Hugging Face `tokenizer.json` and GPT-2 BPE: the same `tokenizers.Tokenizer` object training
  used, saved as is.

No BOS/EOS is added on encode (training separates documents by eod alone); `eos_token` is the
eod token, so generation stops where a training document would end.
"""

from __future__ import annotations

from megatron_lcot.data.tokenizers import (
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    LcotTokenizer,
    SentencePieceTokenizer,
)


class NoHFTokenizer(ValueError):
    """A tokenizer that has no Hugging Face form; the message says what to do."""


def _sentencepiece_to_tokenizers(tokenizer: SentencePieceTokenizer):
    from sentencepiece import sentencepiece_model_pb2
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    with open(tokenizer.path, "rb") as f:
        proto.ParseFromString(f.read())
    return SpmConverter.build_tokenizer_from_spm_proto(proto, tokenizer.vocab)


def hf_tokenizer(tokenizer: LcotTokenizer):
    """A transformers `PreTrainedTokenizerFast` that encodes like `tokenizer`."""
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, SentencePieceTokenizer):
        backend = _sentencepiece_to_tokenizers(tokenizer)
    elif isinstance(tokenizer, (HuggingFaceTokenizer, GPT2BPETokenizer)):
        backend = tokenizer.backend
    else:
        raise NoHFTokenizer(
            f"the checkpoint was trained with {type(tokenizer).__name__}, which has no Hugging Face form "
            "(its text is already token ids); export writes no tokenizer files for it."
        )
    eos = backend.id_to_token(tokenizer.eod)
    bos_id = getattr(tokenizer, "bos", None)
    special = {"eos_token": eos}
    if bos_id is not None and bos_id >= 0:
        special["bos_token"] = backend.id_to_token(bos_id)
    if isinstance(tokenizer, SentencePieceTokenizer):
        special["unk_token"] = backend.id_to_token(0)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        **special,
    )
