"""Prompts to token ids, on a worker thread of the HTTP side: never on the engine thread, so a long
prompt being tokenized does not hold up the streams in flight. The token ids are then checked by
the engine (`RequestLimits`), like every request's.

What is tokenized is bounded before the tokenizer runs. A text of C characters has at least C / L
tokens, where L is the longest token's length in characters; a chat adds, besides its messages'
roles and contents, at least the chat template's own tokens per message (measured once, on empty
messages). A prompt that cannot fit max_input_length by these bounds is refused untokenized, and
the request body is bounded accordingly (see `max_body_bytes`).
"""

from __future__ import annotations

import asyncio
import threading

from atb_llm.models.base.router import get_router
from atb_llm.runtime.engine import LLMEngine
from atb_llm.runtime.request_limits import ContextLengthError

Prompt = str | list[int] | list[dict[str, str]]


class BadTextError(ValueError):
    """A string that is not valid Unicode (a lone UTF-16 surrogate) (HTTP 400)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class PromptEncoder:
    def __init__(self, engine: LLMEngine):
        self.cfg = engine.cfg
        # a tokenizer of its own: Hugging Face tokenizers are not safe to call from two threads
        self.tokenizer = get_router(engine.cfg.model_path).get_tokenizer()
        self.max_token_chars = max(len(t) for t in self.tokenizer.get_vocab())
        self.message_tokens = self._template_tokens_per_message()
        self._lock = threading.Lock()

    def _template_tokens_per_message(self) -> int:
        """The fewest tokens the chat template adds for one more message (0 without a template)."""
        if not getattr(self.tokenizer, "chat_template", None):
            return 0
        counts = [
            len(self._chat_ids([{"role": role, "content": ""}] * k)) for role in ("user", "assistant") for k in (1, 2)
        ]
        return max(0, min(counts[1] - counts[0], counts[3] - counts[2]))

    def max_body_bytes(self) -> int:
        """The largest request body worth reading: the longest prompt max_input_length tokens can be,
        at 6 bytes a character (JSON's \\uXXXX escapes), plus 1 MiB for the other fields."""
        return 6 * self.max_token_chars * self.cfg.max_input_length + 2**20

    async def encode(self, prompt: Prompt, param: str) -> list[int]:
        """Token ids of a text, token-id or chat prompt; raises BadTextError, ContextLengthError (too
        long by the bounds above), or ValueError (no chat template)."""
        texts = [(prompt, param)] if isinstance(prompt, str) else []
        chat = bool(prompt) and isinstance(prompt[0], dict)
        if chat:
            texts = [(m[k], f"{param}.{i}.{k}") for i, m in enumerate(prompt) for k in ("role", "content")]
            least = len(prompt) * self.message_tokens
            if least > self.cfg.max_input_length:
                raise ContextLengthError(
                    f"{len(prompt)} messages take at least {least} tokens of the chat template alone, more than "
                    f"max_input_length={self.cfg.max_input_length}; send fewer messages",
                    param,
                )
        for text, where in texts:
            check_unicode(text, where)
        chars = sum(len(t) for t, _ in texts)
        if chars > self.cfg.max_input_length * self.max_token_chars:
            raise ContextLengthError(
                f"the prompt has {chars} characters, more than max_input_length={self.cfg.max_input_length} "
                f"tokens can hold (a token is at most {self.max_token_chars} characters); shorten it",
                param,
            )
        return prompt if not texts else await asyncio.to_thread(self._tokenize, prompt)

    def _tokenize(self, prompt: str | list[dict[str, str]]) -> list[int]:
        with self._lock:
            if isinstance(prompt, str):
                return self.tokenizer.encode(prompt, add_special_tokens=False)
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(
                    f"the tokenizer of {self.cfg.model_path} has no chat template; "
                    "use /v1/completions with a plain prompt"
                )
            return self._chat_ids(prompt)

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return list(
            self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
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
