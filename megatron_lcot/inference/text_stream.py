"""Incremental detokenization of one generated sequence, with stop strings.

Printing tokens as they come needs text pieces whose concatenation is the final text. Decoding
each token alone is wrong (SentencePiece drops a piece's leading space at the start of a text;
byte-fallback characters span several tokens), so a `TextStream` decodes the whole generated
sequence after each token and hands out the part not handed out yet. It holds back text that
may still change: a trailing U+FFFD (an unfinished multi-byte character) and a tail that could
be the beginning of a stop string. The sequence is decoded after the prompt's last token and
that token's text is removed: decoding the new tokens alone would drop the space that begins
them (SentencePiece strips a leading space at the start of a text). When a stop string
appears, the text ends right before its first occurrence and the sequence is finished
(transformers' `stop_strings` keeps the stop string; lm-eval's `until` and most servers cut
it, as here).
"""

from __future__ import annotations

from collections.abc import Callable

UNFINISHED_CHARACTER = "\ufffd"


class TextStream:
    """detokenize: token ids -> text. stop: strings that end the sequence. eod: a token id that
    ends the sequence and is left out of the text (None: none). context: the token ids just
    before the generated ones (the prompt's last), decoded with them and then removed."""

    def __init__(
        self, detokenize: Callable[[list], str], stop: tuple = (), eod: int | None = None, context: list = ()
    ) -> None:
        self.detokenize, self.stop, self.eod, self.context = detokenize, tuple(stop), eod, list(context)
        self.context_text = detokenize(self.context) if self.context else ""
        self.tokens: list = []
        self.text = ""  # handed out so far
        self.finished = False

    def push(self, token: int) -> str:
        """Add a generated token; returns the new text it makes final ('' if none yet)."""
        self.tokens.append(token)
        if token == self.eod:
            self.finished = True
            return self._hand_out(self._decoded(), hold_back=False)
        decoded = self._decoded()
        cut = min((i for i in (decoded.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.finished = True
            return self._hand_out(decoded[:cut], hold_back=False)
        return self._hand_out(decoded, hold_back=True)

    def close(self) -> str:
        """The text held back when generation ended without a stop (length limit)."""
        return "" if self.finished else self._hand_out(self._decoded(), hold_back=False)

    def _decoded(self) -> str:
        generated = [t for t in self.tokens if t != self.eod]
        text = self.detokenize(self.context + generated)
        if text.startswith(self.context_text):
            return text[len(self.context_text) :]
        return self.detokenize(generated)

    def _hand_out(self, decoded: str, hold_back: bool) -> str:
        end = len(decoded)
        if hold_back:
            end = len(decoded.rstrip(UNFINISHED_CHARACTER))
            held = max(
                (n for s in self.stop for n in range(1, len(s)) if decoded[:end].endswith(s[:n])), default=0
            )
            end -= held
        piece = decoded[len(self.text) : end] if end > len(self.text) else ""
        self.text += piece
        return piece
