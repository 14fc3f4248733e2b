"""Token log-probabilities in OpenAI's two response shapes: /v1/completions (`tokens`,
`token_logprobs`, `top_logprobs`, `text_offset`) and /v1/chat/completions (`content`: one entry
per token with its `bytes` and `top_logprobs`).

Token texts come from a table built once from the vocabulary, so answering never calls the
tokenizer: byte-level BPE tokens map back to their bytes through GPT-2's byte alphabet, added
tokens are their own text. A token that ends inside a UTF-8 character shows U+FFFD in its text
and its exact bytes in `bytes`.
"""

from __future__ import annotations

from transformers.convert_slow_tokenizer import bytes_to_unicode

from atb_llm.runtime.sequence import TokenLogprob


class TokenTexts:
    def __init__(self, tokenizer):
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        self.bytes: dict[int, bytes] = {}
        for token, i in tokenizer.get_vocab().items():
            if i in added:
                self.bytes[i] = added[i].encode()
            elif all(c in byte_of for c in token):
                self.bytes[i] = bytes(byte_of[c] for c in token)
            else:  # not byte-level (sentencepiece): the piece with its space marker
                self.bytes[i] = token.replace("\u2581", " ").encode()

    def text(self, token_id: int) -> str:
        return self.bytes.get(token_id, b"").decode("utf-8", errors="replace")

    def join(self, token_ids: list[int]) -> str:
        return b"".join(self.bytes.get(t, b"") for t in token_ids).decode("utf-8", errors="replace")


def completion_logprobs(
    token_ids: list[int], entries: list[TokenLogprob | None], texts: TokenTexts, start: int = 0
) -> dict:
    """One entry per token of `token_ids`; None for the first prompt token, which has no log-probability.
    `start`: the text offset of the first token (where a stream's chunk begins)."""
    tokens = [texts.text(t) for t in token_ids]
    offsets, at = [], start
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return dict(
        tokens=tokens,
        token_logprobs=[None if e is None else e.logprob for e in entries],
        top_logprobs=[None if e is None else {texts.text(t): lp for t, lp in e.top} for e in entries],
        text_offset=offsets,
    )


def chat_logprobs(entries: list[TokenLogprob], texts: TokenTexts) -> dict:
    def one(token_id: int, logprob: float) -> dict:
        return dict(token=texts.text(token_id), logprob=logprob, bytes=list(texts.bytes.get(token_id, b"")))

    content = [one(e.token_id, e.logprob) | dict(top_logprobs=[one(t, lp) for t, lp in e.top]) for e in entries]
    return dict(content=content, refusal=None)
