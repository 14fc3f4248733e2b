"""The one check of a request against the model and the engine's limits, made at admission.

`SamplingParams` checks the values that need no model (ranges of temperature, top_p, ...);
`RequestLimits.check` checks everything that does: the prompt's length and token ids, max_tokens
against max_output_length, every token id a request names (stop_token_ids, logprob_token_ids,
force_tokens) against the vocabulary, and whether prompt + max_tokens can ever fit the KV cache.
A request that passes cannot make an engine step fail on its values. The errors are typed, so
each entry point maps them to its own answer (the server: 413 or 422), and each names the value
and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from atb_llm.runtime.sequence import SamplingParams

MAX_STOP_TOKEN_IDS = 256  # stop_token_ids per request: each is looked up every step


class RequestError(ValueError):
    """A request the engine refuses because of one of its values; `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(RequestError):
    """The prompt, or prompt + max_tokens, is longer than the engine can ever hold."""


def short(value: object, limit: int = 40) -> str:
    """repr(value), cut to `limit` characters: an error quotes a bad value, never echoes it whole."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}...({len(text)} characters)"


@dataclass(frozen=True)
class RequestLimits:
    """max_input_length / max_output_length: the engine's; vocab_size: the model's (token ids lie in
    [0, vocab_size)); max_sequence_tokens: the most tokens one sequence can hold in the KV cache
    pools (at most max_input_length + max_output_length)."""

    max_input_length: int
    max_output_length: int
    vocab_size: int
    max_sequence_tokens: int

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises ContextLengthError or RequestError naming the first value out of bounds."""
        if not prompt_ids:
            raise RequestError("the prompt is empty; give at least one token", "prompt")
        if len(prompt_ids) > self.max_input_length:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens, more than max_input_length={self.max_input_length}; "
                "shorten it or raise --max_input_length",
                "prompt",
            )
        self.check_token_ids(prompt_ids, "prompt")
        self.check_params(params)
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_sequence_tokens:
            raise ContextLengthError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} tokens; the KV "
                f"cache holds at most {self.max_sequence_tokens} in one sequence; lower max_tokens or give the "
                "cache more memory",
                "max_tokens",
            )

    def check_params(self, params: SamplingParams) -> None:
        """The part of `check` that needs no prompt (a server can run it before tokenizing)."""
        if params.max_tokens > self.max_output_length:
            raise RequestError(
                f"max_tokens={params.max_tokens} exceeds max_output_length={self.max_output_length}; "
                "lower it or raise --max_output_length",
                "max_tokens",
            )
        for name in ("stop_token_ids", "logprob_token_ids", "force_tokens"):
            ids = getattr(params, name)
            if name == "stop_token_ids" and len(ids) > MAX_STOP_TOKEN_IDS:
                raise RequestError(f"{name} has {len(ids)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed", name)
            self.check_token_ids(ids, name)

    def check_token_ids(self, ids: list[int] | tuple[int, ...], param: str) -> None:
        bad = [t for t in ids if type(t) is not int or not 0 <= t < self.vocab_size]
        if bad:
            shown = ", ".join(short(t, 24) for t in bad[:3])
            raise RequestError(
                f"{param} has token id(s) outside the vocabulary [0, {self.vocab_size}): {shown}; "
                "use ids the model's tokenizer gives",
                param,
            )
