"""Text deltas for streaming: what of a sequence's output is safe to send so far.

Two things are held back until the next token decides them:
- trailing U+FFFD: the first bytes of a UTF-8 character split across tokens decode to the
  replacement character, which would be sent broken;
- a tail that could be the start of a stop string: once the stop string completes, the text from
  it on must never have been sent.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


def stop_prefix_len(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class TextStream:
    """Feed it the whole decoded output after every token; it returns the new text to send.

    `text` is the sequence's output so far as the engine decodes it (`LLMEngine.text_of`: cut at
    a stop string, without the eos). The concatenated deltas equal the final `text`.
    """

    def __init__(self, stop: tuple[str, ...] = ()):
        self.stop = stop
        self.sent = ""

    def delta(self, text: str, finished: bool) -> str:
        safe = text if finished else self._settled(text)
        # Text already sent is never retracted (byte-level BPE never revises decoded text).
        out = safe[len(self.sent) :]
        self.sent += out
        return out

    def _settled(self, text: str) -> str:
        text = text.rstrip(REPLACEMENT)
        return text[: len(text) - stop_prefix_len(text, self.stop)]
