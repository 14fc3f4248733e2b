"""From a validated request to the engine loop and back: sampling parameters, submission, the
collected (non-streaming) answer, and the server-sent-event stream in OpenAI's chunk format.

A request whose client goes away is aborted, so its sequence stops and its blocks are freed:
streaming, when the response is cancelled or closed; non-streaming, by polling the connection.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from atb_llm.runtime.sequence import SamplingParams
from examples.server.engine_loop import EngineLoop, GenerationEvent, GenerationRequest, RequestStream, ShuttingDownError
from examples.server.errors import APIError, error_body
from examples.server.prompts import BadTextError, Prompt, PromptEncoder, RequestTooLargeError
from examples.server.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
    SamplingFields,
    Usage,
)

DISCONNECT_POLL_S = 0.5


class ClientGone(Exception):
    """The client of a non-streaming request disconnected; its request was aborted."""


def sampling_params(body: SamplingFields, max_tokens: int | None, max_output_length: int) -> SamplingParams:
    max_tokens = max_tokens or max_output_length
    if max_tokens > max_output_length:
        raise APIError(
            422,
            f"max_tokens={max_tokens} exceeds this server's max_output_length={max_output_length}; "
            "lower it or restart the server with a larger --max_output_length",
            "max_tokens",
            "invalid_value",
        )
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            seed=body.seed,
            ignore_eos=body.ignore_eos,
            stop=body.stop_strings(),
        )
    except ValueError as e:
        raise APIError(422, str(e), code="invalid_value") from e


async def submit(
    loop: EngineLoop, encoder: PromptEncoder, request_id: str, prompt: Prompt, params: SamplingParams, param: str
) -> RequestStream:
    """Tokenize (off the engine thread), then hand the request to the engine thread; rejections
    become 400 (text), 413 (size), 422 (value) or 503 (shutting down)."""
    try:
        ids = await encoder.encode(prompt, params, param)
        return await loop.submit(GenerationRequest(request_id, ids, params))
    except BadTextError as e:
        raise APIError(400, str(e), e.param, "invalid_text") from e
    except RequestTooLargeError as e:
        raise APIError(413, str(e), param, "context_length_exceeded") from e
    except ShuttingDownError as e:
        raise APIError(503, str(e), code="shutting_down") from e
    except ValueError as e:
        raise APIError(422, str(e), param, "invalid_value") from e


def check_finish(event: GenerationEvent) -> None:
    """An engine-side end (shutdown, engine failure) is an error for the client."""
    if event.finish_reason == "error":
        raise APIError(500, event.error or "the engine failed")
    if event.finish_reason == "abort":
        raise APIError(503, event.error or "the request was cancelled by the server")


@dataclass
class Answer:
    """A finished non-streaming request."""

    request_id: str
    text: str
    finish_reason: str
    usage: Usage


async def collect(loop: EngineLoop, stream: RequestStream, request: Request) -> Answer:
    """The whole answer; raises ClientGone (after aborting the request) if the client left."""
    parts, checked = [], time.monotonic()
    while True:
        try:
            event = await stream.next(timeout=DISCONNECT_POLL_S)
        except TimeoutError:
            event = None
        if time.monotonic() - checked >= DISCONNECT_POLL_S:
            checked = time.monotonic()
            if await request.is_disconnected():
                loop.abort(stream.request_id)
                raise ClientGone(stream.request_id)
        if event is None:
            continue
        parts.append(event.text)
        if event.finish_reason:
            check_finish(event)
            usage = Usage.of(stream.num_prompt_tokens, event.num_output_tokens)
            return Answer(stream.request_id, "".join(parts), event.finish_reason, usage)


@dataclass
class ChunkFormat:
    """Writes one request's stream chunks: chat.completion.chunk or text_completion."""

    request_id: str
    model: str
    chat: bool
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))

    def _chunk(self, choices: list, usage: Usage | None = None) -> str:
        cls = ChatCompletionChunk if self.chat else Completion
        body = cls(id=self.request_id, model=self.model, created=self.created, choices=choices, usage=usage)
        return sse(body.model_dump_json())

    def _choice(self, text: str | None, finish_reason: str | None = None) -> ChatChunkChoice | CompletionChoice:
        """text None: the chat opening, which names the role."""
        if not self.chat:
            return CompletionChoice(text=text or "", finish_reason=finish_reason)
        delta = ChatDelta(role="assistant", content="") if text is None else ChatDelta(content=text or None)
        return ChatChunkChoice(delta=delta, finish_reason=finish_reason)

    def opening(self) -> list[str]:
        return [self._chunk([self._choice(None)])] if self.chat else []

    def text(self, text: str) -> str:
        return self._chunk([self._choice(text)])

    def closing(self, finish_reason: str, usage: Usage) -> list[str]:
        """The finish chunk; usage rides on it, or, with stream_options.include_usage, follows in a
        chunk of its own with no choices (OpenAI's shape)."""
        if not self.include_usage:
            return [self._chunk([self._choice("", finish_reason)], usage)]
        return [self._chunk([self._choice("", finish_reason)]), self._chunk([], usage)]


def sse(data: str) -> str:
    return f"data: {data}\n\n"


async def event_stream(loop: EngineLoop, stream: RequestStream, fmt: ChunkFormat) -> AsyncIterator[str]:
    """Server-sent events until `data: [DONE]`; an engine-side end (failure, shutdown) sends an
    error event before it."""
    try:
        for chunk in fmt.opening():
            yield chunk
        while True:
            event = await stream.next()
            if event.text:
                yield fmt.text(event.text)
            if event.finish_reason:
                break
        try:
            check_finish(event)
        except APIError as e:  # the error event, then the end of the stream as always
            yield sse(json.dumps(error_body(e.status, e.message)))
            yield sse("[DONE]")
            return
        for chunk in fmt.closing(event.finish_reason, Usage.of(stream.num_prompt_tokens, event.num_output_tokens)):
            yield chunk
        yield sse("[DONE]")
    finally:
        abort_unfinished(loop, stream)


def abort_unfinished(loop: EngineLoop, stream: RequestStream) -> None:
    if not stream.finished:
        loop.abort(stream.request_id)
