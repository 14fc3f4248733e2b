"""Prompts to token ids, on a worker thread of the HTTP side: never on the engine thread, so a long
prompt being tokenized does not hold up the streams in flight. The checks that need no engine
state (text, length, cache fit) happen here too, before anything reaches the engine.

A prompt of C characters has at least C / L tokens, where L is the longest token's length in
characters: a prompt over max_input_length * L characters is refused before it is tokenized, and
the request body is bounded accordingly (see `max_body_bytes`).
"""

from __future__ import annotations

import asyncio
import threading

from atb_llm.models.base.router import get_router
from atb_llm.runtime.engine import LLMEngine
from atb_llm.runtime.sequence import SamplingParams

Prompt = str | list[int] | list[dict[str, str]]


class RequestTooLargeError(ValueError):
    """The prompt is over max_input_length, or prompt + max_tokens can never fit the cache (HTTP 413)."""


class BadTextError(ValueError):
    """A string that is not valid Unicode (a lone UTF-16 surrogate) (HTTP 400)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class PromptEncoder:
    def __init__(self, engine: LLMEngine):
        self.cfg, self.cache = engine.cfg, engine.cache_manager
        # a tokenizer of its own: Hugging Face tokenizers are not safe to call from two threads
        self.tokenizer = get_router(engine.cfg.model_path).get_tokenizer()
        self.max_token_chars = max(len(t) for t in self.tokenizer.get_vocab())
        self._lock = threading.Lock()

    def max_body_bytes(self) -> int:
        """The largest request body worth reading: the longest prompt max_input_length tokens can be,
        at 6 bytes a character (JSON's \\uXXXX escapes), plus 1 MiB for the other fields."""
        return 6 * self.max_token_chars * self.cfg.max_input_length + 2**20

    async def encode(self, prompt: Prompt, params: SamplingParams, param: str) -> list[int]:
        """Token ids of a text, token-id or chat prompt; raises BadTextError, RequestTooLargeError,
        or ValueError (no chat template)."""
        texts = [(prompt, param)] if isinstance(prompt, str) else []
        if prompt and isinstance(prompt[0], dict):
            texts = [(m["content"], f"{param}.{i}.content") for i, m in enumerate(prompt)]
        for text, where in texts:
            check_unicode(text, where)
        chars = sum(len(t) for t, _ in texts)
        if chars > self.cfg.max_input_length * self.max_token_chars:
            raise RequestTooLargeError(
                f"the prompt has {chars} characters, more than max_input_length={self.cfg.max_input_length} "
                f"tokens can hold (a token is at most {self.max_token_chars} characters); shorten it"
            )
        ids = prompt if not texts else await asyncio.to_thread(self._tokenize, prompt)
        self.check_size(ids, params)
        return ids

    def _tokenize(self, prompt: str | list[dict[str, str]]) -> list[int]:
        with self._lock:
            if isinstance(prompt, str):
                return self.tokenizer.encode(prompt, add_special_tokens=False)
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(
                    f"the tokenizer of {self.cfg.model_path} has no chat template; "
                    "use /v1/completions with a plain prompt"
                )
            return list(
                self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
            )

    def check_size(self, ids: list[int], params: SamplingParams) -> None:
        if len(ids) > self.cfg.max_input_length:
            raise RequestTooLargeError(
                f"the prompt has {len(ids)} tokens, more than max_input_length={self.cfg.max_input_length}; "
                "shorten it or restart the server with a larger --max_input_length"
            )
        if not self.cache.fits_alone(len(ids) + params.max_tokens):
            raise RequestTooLargeError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) can never fit the KV cache "
                f"({self.cache.num_blocks} blocks); lower max_tokens or give the server more cache"
            )


def check_unicode(text: str, param: str) -> None:
    """JSON can carry a lone UTF-16 surrogate ("\\ud800"), which is no character and has no UTF-8 form."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadTextError(
            f"{param} has a lone UTF-16 surrogate {text[err.start]!r} at character {err.start}; "
            "send valid Unicode (surrogates only in high-low pairs)",
            param,
        ) from None
