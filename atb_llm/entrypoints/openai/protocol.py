"""OpenAI request and response bodies (the subset this server implements).

Requests: unknown fields are ignored, as OpenAI clients send fields a server may not know; the
OpenAI fields that would change the answer and are not implemented (`UNSUPPORTED`) are refused
with 400 unless they hold their neutral value, so that no client believes it got what it asked.
As in OpenAI's API, `null` means "the default" for every optional field, and types are not
coerced (`"3"` is no integer, `1` no boolean). Values are checked here (pydantic) and map to HTTP
422; `top_k` and `ignore_eos` are extensions.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

# OpenAI fields this server does not implement -> their neutral values (the ones that are accepted)
UNSUPPORTED = {
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
}


class RequestModel(BaseModel):
    """A request body or a part of one: strict types, unknown fields ignored, null = the default."""

    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(RequestModel):
    include_usage: bool = False


class SamplingFields(RequestModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(None, ge=1)  # None: the server's max_output_length
    temperature: float = Field(1.0, ge=0, le=2)  # 0 is greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0 disables it
    n: int = Field(1, ge=1, le=16)  # choices per prompt, sampled from one computation of the prompt
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = 1.0  # extension (vLLM, MindIE); 1 disables it; range: SamplingParams
    min_tokens: int = Field(0, ge=0)  # extension (vLLM): no eos / stop_token_ids before this many
    stop_token_ids: list[int] | None = None  # extension (vLLM): tokens that end the answer
    suffix: Any = None
    logit_bias: Any = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _unsupported(cls, value: Any, info) -> Any:
        if not any(value == neutral and type(value) is type(neutral) for neutral in UNSUPPORTED[info.field_name]):
            neutral = " or ".join(
                repr(v).replace("None", "null").replace("False", "false") for v in UNSUPPORTED[info.field_name]
            )
            raise PydanticCustomError(
                "unsupported",
                "{field} is not supported by this server; leave it out (or send {neutral})",
                {"field": info.field_name, "neutral": neutral},
            )
        return value

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError(f"stop has {len(stop)} strings; at most 4 are allowed")
        return stop

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool = False  # each generated token's log-probability
    top_logprobs: int | None = Field(None, ge=0, le=20)  # with logprobs: this many alternatives per token

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, k: int | None, info) -> int | None:
        if k is not None and not info.data.get("logprobs"):
            raise ValueError(f"top_logprobs={k} needs logprobs=true")
        return k

    best_of: Any = None  # a completions field: refused here unless neutral

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, best_of: Any) -> Any:
        if best_of not in (None, 1):
            raise PydanticCustomError(
                "unsupported",
                "{field} is not supported by this server; leave it out (or send {neutral})",
                {"field": "best_of", "neutral": "null or 1"},
            )
        return best_of

    def chat(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them ("developer" is the newer "system")."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(SamplingFields):
    """`prompt`: a text, token ids, or a list of either (n choices per prompt, in order; not with
    stream). `best_of`: samples per prompt, of which the n with the highest log-probability return.
    `logprobs` = k: each token's log-probability and its k most likely alternatives;
    `echo`: the answer starts with the prompt (and, with logprobs, the prompt tokens' log-probabilities:
    what lm-eval's loglikelihood tasks read); `max_tokens` 0 with echo scores the prompt alone."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=16)  # sample this many, return the n most likely

    @field_validator("best_of")
    @classmethod
    def _at_least_n(cls, best_of: int | None, info) -> int | None:
        n = info.data.get("n", 1)
        if best_of is not None and best_of < n:
            raise ValueError(f"best_of={best_of} must be at least n={n}")
        return best_of

    @field_validator("prompt")
    @classmethod
    def _at_most_16(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list | str) and len(prompt) > 16:
            raise ValueError(f"got {len(prompt)} prompts; send at most 16 per request")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per choice."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str | list):
            return list(self.prompt)
        return [self.prompt]


# ---- responses -------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens found in the prefix cache (not computed again)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: dict | None = None  # {"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    """Only the fields that are set go on the wire: {"role": ...} first, then {"content": ...}, then {}."""

    role: Literal["assistant"] | None = Field(None, exclude_if=lambda v: v is None)
    content: str | None = Field(None, exclude_if=lambda v: v is None)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: dict | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: dict | None = None  # {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    finish_reason: str | None = None


class Completion(BaseModel):
    """Both the response and the stream chunks of /v1/completions (OpenAI uses one shape)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
