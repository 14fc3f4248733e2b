"""The server-sent-event stream of a request in OpenAI's chunk format (chat.completion.chunk or
text_completion), n > 1 choices interleaved as their tokens come."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from atb_llm.entrypoints.openai.engine_loop import EngineLoop, GenerationEvent, RequestStream
from atb_llm.entrypoints.openai.errors import APIError, error_body
from atb_llm.entrypoints.openai.generation import Shape, abort_unfinished, check_finish
from atb_llm.entrypoints.openai.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
    Usage,
)


@dataclass
class ChunkFormat:
    """Writes one request's stream chunks: chat.completion.chunk or text_completion."""

    request_id: str
    model: str
    shape: Shape
    include_usage: bool
    index: int = 0  # the choice these chunks belong to (n > 1)
    created: int = field(default_factory=lambda: int(time.time()))
    offset: int = 0  # completions: text offset of the next token, for logprobs' text_offset

    @property
    def chat(self) -> bool:
        return self.shape.chat

    def _chunk(self, choices: list, usage: Usage | None = None) -> str:
        cls = ChatCompletionChunk if self.chat else Completion
        body = cls(id=self.request_id, model=self.model, created=self.created, choices=choices, usage=usage)
        return sse(body.model_dump_json())

    def _choice(
        self, text: str | None, finish_reason: str | None = None, ids: list[int] = (), entries: list = ()
    ) -> ChatChunkChoice | CompletionChoice:
        """text None: the chat opening, which names the role."""
        if not self.chat:
            lp = self.shape.completion_logprobs(list(ids), list(entries), self.offset) if ids else None
            self.offset += sum(len(t) for t in lp["tokens"]) if lp else 0
            return CompletionChoice(index=self.index, text=text or "", logprobs=lp, finish_reason=finish_reason)
        delta = ChatDelta(role="assistant", content="") if text is None else ChatDelta(content=text or None)
        lp = self.shape.chat_logprobs(list(entries)) if entries else None
        return ChatChunkChoice(index=self.index, delta=delta, logprobs=lp, finish_reason=finish_reason)

    def opening(self, prompt: str | list[int], stream: RequestStream, first: GenerationEvent) -> list[str]:
        """Chat: the role. Completions with echo: the prompt (and its log-probabilities)."""
        if self.chat:
            return [self._chunk([self._choice(None)])]
        if not self.shape.echo:
            return []
        ids = stream.prompt_ids
        entries = first.prompt_logprobs or [None] * len(ids)
        return [self._chunk([self._choice(self.shape.echo_text(prompt, ids), None, ids, entries)])]

    def event(self, event: GenerationEvent) -> list[str]:
        if self.shape.score_only or not (event.text or event.logprobs):
            return []
        ids = [e.token_id for e in event.logprobs]
        return [self._chunk([self._choice(event.text, None, ids, event.logprobs)])]

    def closing(self, finish_reason: str, usage: Usage | None) -> list[str]:
        """The finish chunk; usage (None: not yet, other choices are running) rides on it, or, with
        stream_options.include_usage, follows in a chunk of its own with no choices (OpenAI's shape)."""
        if usage is None:
            return [self._chunk([self._choice("", finish_reason)])]
        if not self.include_usage:
            return [self._chunk([self._choice("", finish_reason)], usage)]
        return [self._chunk([self._choice("", finish_reason)]), self._chunk([], usage)]


def sse(data: str) -> str:
    return f"data: {data}\n\n"


async def event_stream(
    loop: EngineLoop, streams: list[RequestStream], fmts: list[ChunkFormat], prompt: str | list[int]
) -> AsyncIterator[str]:
    """Server-sent events of one prompt's choices (n > 1: interleaved as their tokens come, each
    chunk naming its choice) until `data: [DONE]`; usage rides on the last finish chunk. An
    engine-side end (failure, shutdown) of any choice sends an error event before it."""
    pending: dict[asyncio.Future, int] = {}
    try:
        pending = {asyncio.ensure_future(st.next()): i for i, st in enumerate(streams)}
        opened, generated, left = [False] * len(streams), 0, len(streams)
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.get):
                i, event = pending.pop(task), task.result()
                streams[i].cached_tokens = max(streams[i].cached_tokens, event.cached_tokens)
                if not opened[i] and event.finish_reason not in ("error", "abort"):
                    opened[i] = True
                    for chunk in fmts[i].opening(prompt, streams[i], event):
                        yield chunk
                for chunk in fmts[i].event(event):
                    yield chunk
                if not event.finish_reason:
                    pending[asyncio.ensure_future(streams[i].next())] = i
                    continue
                try:
                    check_finish(event)
                except APIError as e:  # the error event, then the end of the stream as always
                    yield sse(json.dumps(error_body(e.status, e.message, e.param, e.code)))
                    yield sse("[DONE]")
                    return
                generated, left = generated + event.num_output_tokens, left - 1
                cached = max(st.cached_tokens for st in streams)
                usage = fmts[i].shape.usage(streams[i].num_prompt_tokens, generated, cached) if not left else None
                for chunk in fmts[i].closing(event.finish_reason, usage):
                    yield chunk
        yield sse("[DONE]")
    finally:
        for task in pending:
            task.cancel()
        for st in streams:
            abort_unfinished(loop, st)
