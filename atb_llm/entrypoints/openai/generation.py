"""From a validated request to the engine loop and back: sampling parameters, submission and the
collected (non-streaming) answer (the event stream is in streaming.py).

A request whose client goes away is aborted, so its sequence stops and its blocks are freed:
streaming, when the response is cancelled or closed; non-streaming, by polling the connection.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from fastapi import Request

from atb_llm.entrypoints.openai.engine_loop import (
    EngineLoop,
    GenerationEvent,
    GenerationRequest,
    RequestStream,
    ShuttingDownError,
)
from atb_llm.entrypoints.openai.errors import APIError
from atb_llm.entrypoints.openai.logprobs import TokenTexts, chat_logprobs, completion_logprobs
from atb_llm.entrypoints.openai.prompts import BadTextError, Prompt, PromptEncoder
from atb_llm.entrypoints.openai.protocol import (
    CompletionChoice,
    SamplingFields,
    Usage,
)
from atb_llm.runtime.request_limits import ContextLengthError, RequestError, RequestLimits
from atb_llm.runtime.sequence import SamplingParams, TokenLogprob

DISCONNECT_POLL_S = 0.5


class ClientGone(Exception):
    """The client of a non-streaming request disconnected; its request was aborted."""


def sampling_params(
    body: SamplingFields,
    max_tokens: int | None,
    limits: RequestLimits,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """The request's sampling, checked (by SamplingParams and the engine's limits) before its prompt
    is tokenized."""
    max_tokens = limits.max_output_length if max_tokens is None else max(max_tokens, 1)  # 0 (echo only): one, unsent
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            seed=body.seed,
            ignore_eos=body.ignore_eos,
            stop=body.stop_strings(),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
            min_tokens=body.min_tokens,
            stop_token_ids=tuple(body.stop_token_ids or ()),
        )
        limits.check_params(params)
        return params
    except RequestError as e:
        raise request_error(e) from e


def request_error(e: RequestError, prompt_param: str | None = None) -> APIError:
    """The engine's refusal of a request as the API's error: 413 for what is too long, else 422.
    `prompt_param`: the route's name for the prompt (prompt, messages)."""
    if isinstance(e, ContextLengthError):
        return APIError(413, str(e), prompt_param or e.param, "context_length_exceeded")
    param = prompt_param if prompt_param and e.param == "prompt" else e.param
    return APIError(422, str(e), param, "invalid_value")


async def submit(
    loop: EngineLoop,
    encoder: PromptEncoder,
    request_id: str,
    prompt: Prompt,
    params: list[SamplingParams],
    param: str,
    adapter: str | None = None,
) -> list[RequestStream]:
    """Tokenize (off the engine thread), then hand the engine thread one request per sample, all in
    one command (the samples after the first as its siblings: the prompt is computed once); the
    engine checks them (RequestLimits) and refuses all or none: 400 (text), 413 (size), 422
    (value) or 503 (shutting down)."""
    try:
        ids = await encoder.encode(prompt, param)
        ids_of = [request_id] if len(params) == 1 else [f"{request_id}-{j}" for j in range(len(params))]
        requests = [
            GenerationRequest(rid, ids, p, sibling_of=ids_of[0] if j else None, adapter=adapter)
            for j, (rid, p) in enumerate(zip(ids_of, params))
        ]
        return await loop.submit(*requests)
    except BadTextError as e:
        raise APIError(400, str(e), e.param, "invalid_text") from e
    except RequestError as e:
        raise request_error(e, param) from e
    except ShuttingDownError as e:
        raise APIError(503, str(e), code="shutting_down") from e
    except ValueError as e:  # no chat template
        raise APIError(422, str(e), param, "invalid_value") from e


def check_finish(event: GenerationEvent) -> None:
    """An end that is not the answer's: this request failed alone (500), or the engine stopped (503)."""
    if event.finish_reason == "error":
        raise APIError(500, f"the request failed: {event.error or 'unknown error'}", code="request_failed")
    if event.finish_reason == "abort":
        raise APIError(503, event.error or "the request was cancelled by the server", code="shutting_down")


def samples(params: SamplingParams, n: int, best_of: int) -> list[SamplingParams]:
    """The sampling of each of a prompt's `best_of` samples: seeded ones get seeds seed, seed + 1, ...
    (so they differ); with best_of > n each records its tokens' log-probabilities, to be ranked."""
    if best_of > n and params.logprobs is None:
        params = replace(params, logprobs=0)
    if params.seed is None:
        return [params] * best_of
    return [replace(params, seed=(params.seed + j) % SamplingParams.SEED_RANGE) for j in range(best_of)]


def best(answers: list[Answer], n: int) -> list[Answer]:
    """The n answers of highest total log-probability, best first (all of them, in order, when n
    is all there are)."""
    if len(answers) == n:
        return answers
    return sorted(answers, key=lambda a: sum(e.logprob for e in a.logprobs), reverse=True)[:n]


@dataclass
class Answer:
    """A finished non-streaming request."""

    request_id: str
    prompt_ids: list[int]
    text: str
    finish_reason: str
    num_output_tokens: int
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob | None] | None
    cached_tokens: int = 0  # prompt tokens found in the prefix cache


async def collect(loop: EngineLoop, stream: RequestStream, request: Request) -> Answer:
    """The whole answer; raises ClientGone (after aborting the request) if the client left."""
    parts, logprobs, prompt_logprobs, checked = [], [], None, time.monotonic()
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
        stream.cached_tokens = max(stream.cached_tokens, event.cached_tokens)
        logprobs += event.logprobs
        prompt_logprobs = prompt_logprobs or event.prompt_logprobs
        if event.finish_reason:
            check_finish(event)
            text, n = "".join(parts), event.num_output_tokens
            return Answer(stream.request_id, stream.prompt_ids, text, event.finish_reason, n, logprobs, prompt_logprobs,
                          stream.cached_tokens)  # fmt: skip


@dataclass
class Shape:
    """What the client asked to get back besides the text: `logprobs` (completions: alternatives per
    token; chat: top_logprobs, 0 if unset; None: no log-probabilities), `echo` (completions: the
    prompt first, with its log-probabilities), `score_only` (max_tokens 0: the one generated token is
    not sent)."""

    texts: TokenTexts
    chat: bool = False
    logprobs: int | None = None
    echo: bool = False
    score_only: bool = False

    def completion_logprobs(self, ids: list[int], entries: list, start: int = 0) -> dict | None:
        return None if self.logprobs is None else completion_logprobs(ids, entries, self.texts, start)

    def chat_logprobs(self, entries: list[TokenLogprob]) -> dict | None:
        return None if self.logprobs is None else chat_logprobs(entries, self.texts)

    def echo_text(self, prompt: str | list[int], prompt_ids: list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.texts.join(prompt_ids)

    def completion_choice(self, index: int, prompt: str | list[int], a: Answer) -> CompletionChoice:
        text, ids, entries = a.text, [], []
        generated = [] if self.score_only else a.logprobs
        if self.score_only:
            text = ""
        if self.echo:
            text = self.echo_text(prompt, a.prompt_ids) + text
            ids, entries = list(a.prompt_ids), list(a.prompt_logprobs or [None] * len(a.prompt_ids))
        ids += [e.token_id for e in generated]
        lp = self.completion_logprobs(ids, entries + generated)
        return CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=a.finish_reason)

    def usage(self, prompt_tokens: int, output_tokens: int, cached_tokens: int = 0) -> Usage:
        return Usage.of(prompt_tokens, 0 if self.score_only else output_tokens, cached_tokens)


def abort_unfinished(loop: EngineLoop, stream: RequestStream) -> None:
    if not stream.finished:
        loop.abort(stream.request_id)


def abort_all(loop: EngineLoop, streams: list[RequestStream]) -> None:
    for stream in streams:
        abort_unfinished(loop, stream)
