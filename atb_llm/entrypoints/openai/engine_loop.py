"""The engine thread: the one thread that touches the engine.

The engine is not thread-safe, so one thread owns it and runs: drain the command queue (add /
abort), `step()`, publish every sequence's new text to its request's asyncio queue with
`loop.call_soon_threadsafe`. The HTTP layer only puts commands on the queue and awaits its own
queues, so it never blocks on a forward pass; it tokenizes prompts itself (atb_llm/entrypoints/openai/prompts.py),
so the engine thread never waits on a tokenizer either.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field

import torch

from atb_llm.entrypoints.openai.metrics import Metrics
from atb_llm.entrypoints.openai.text_stream import TextStream
from atb_llm.runtime.engine import LLMEngine
from atb_llm.runtime.sequence import SamplingParams, Sequence, TokenLogprob
from atb_llm.runtime.stats import EngineStats

log = logging.getLogger("atb_llm.server")


class ShuttingDownError(RuntimeError):
    """The server is stopping, or its engine failed, and takes no new request (HTTP 503)."""


@dataclass
class GenerationRequest:
    """What the HTTP layer asks for: the prompt's token ids and sampling."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sibling_of: str | None = None  # n > 1: an earlier request with the same prompt, computed once for both
    adapter: str | None = None  # a LoRA adapter's name; None: the base model


@dataclass
class GenerationEvent:
    """A request's new output, published after each step that gave it a token."""

    text: str  # new text since the previous event; "" while a character or stop string is undecided
    num_output_tokens: int
    finish_reason: str | None = None  # None while running; stop | length | abort | error
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens new since the last event
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first event, when asked for
    cached_tokens: int = 0  # on the first event: prompt tokens found in the prefix cache


@dataclass
class RequestStream:
    """The HTTP side of one request: its events arrive on `events`, the last one has a finish_reason."""

    request_id: str
    prompt_ids: list[int]
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False
    cached_tokens: int = 0  # from its first event

    async def next(self, timeout: float | None = None) -> GenerationEvent:
        """The next event; raises TimeoutError after `timeout` seconds without one."""
        event = await asyncio.wait_for(self.events.get(), timeout)
        self.finished = event.finish_reason is not None
        return event

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)


@dataclass
class _Live:
    seq: Sequence
    stream: RequestStream
    loop: asyncio.AbstractEventLoop
    text: TextStream
    adapter: str = "base"
    logprobs_sent: int = 0
    events_sent: int = 0


@dataclass
class _Add:
    """Requests added together, in one command: the samples of one prompt (siblings) are all in the
    engine before its next step, whatever the first of them does at its first token."""

    requests: list[GenerationRequest]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class EngineLoop:
    def __init__(self, engine: LLMEngine, metrics: Metrics | None = None):
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.stats: EngineStats = engine.stats()  # replaced (never mutated) by the engine thread
        self._commands: queue.Queue = queue.Queue()
        self._live: dict[str, _Live] = {}
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._stopping = False
        self.failure: str | None = None  # set when a step failed for a reason no one request explains

    # ---- called from the HTTP side ----------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        """Begin shutting down without waiting: new requests get ShuttingDownError, and the engine
        thread ends every request in flight (finish_reason "abort") after its current step."""
        self._stopping = True
        self._commands.put(None)

    def stop(self, timeout: float = 30.0) -> None:
        self.request_stop()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def submit(self, *requests: GenerationRequest) -> list[RequestStream]:
        """Queue requests together (all or none); returns their streams once the engine accepted them.
        Raises the engine's RequestError for a request it rejects, ShuttingDownError once stopping."""
        if self._stopping:
            raise ShuttingDownError(self._stop_reason())
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put(_Add(list(requests), loop, future))
        try:
            return await future
        except asyncio.CancelledError:  # the client left before the engine took the requests
            for request in requests:
                self.abort(request.request_id)
            raise

    def _stop_reason(self) -> str:
        if self.failure:
            return f"the engine failed and stopped ({self.failure}); restart the server"
        return "the server is shutting down; retry on another replica or later"

    def abort(self, request_id: str) -> None:
        """Cancel a request (unknown or finished ids are ignored); its blocks are freed at once."""
        self._commands.put(request_id)

    # ---- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                self._drain(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished() and not self._stopping:
                    self._step()
                self.stats = self.engine.stats()
        for request_id in list(self._live):
            self._abort(request_id, "abort", self._stop_reason())
        while True:  # requests queued while it stopped: tell them, or their clients wait forever
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                _post(command.loop, _resolve, command.future, None, ShuttingDownError(self._stop_reason()))

    def _drain(self, block: bool) -> None:
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return
        while command is not None:
            if isinstance(command, _Add):
                self._add(command)
            else:
                self._abort(command, "abort")
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _add(self, command: _Add) -> None:
        streams = []
        try:
            for request in command.requests:
                seq = self.engine.add_request(
                    request.prompt_ids, request.params, request.request_id, request.sibling_of, request.adapter
                )
                stream = RequestStream(request.request_id, request.prompt_ids)
                text = TextStream(request.params.stop)
                self._live[request.request_id] = _Live(seq, stream, command.loop, text, request.adapter or "base")
                streams.append(stream)
        except Exception as e:  # RequestError for bad input; anything else still answers the client
            for stream in streams:  # all or none
                self._live.pop(stream.request_id, None)
                self.engine.abort(stream.request_id)
            _post(command.loop, _resolve, command.future, None, e)
            return
        _post(command.loop, _resolve, command.future, streams, None)

    def _step(self) -> None:
        try:
            seqs = self.engine.step()
        except Exception as e:  # no one request explains it: stop cleanly (health fails, clients get 503)
            log.exception("engine step failed; stopping the engine and ending %d request(s)", len(self._live))
            self.failure = f"{type(e).__name__}: {e}"
            self._stopping = True
            return
        for seq in seqs:
            live = self._live.get(seq.request_id)
            if live is None:
                continue
            try:
                self._publish(live)
            except Exception as e:  # its text or log-probabilities: its own failure
                log.exception("request %s failed", seq.request_id)
                self._abort(seq.request_id, "error", f"{type(e).__name__}: {e}")

    def _publish(self, live: _Live) -> None:
        seq = live.seq
        n = len(seq.output_token_ids)
        if n == 1:
            self.metrics.observe_first_token(seq.time_to_first_token())
        text = live.text.delta(self.engine.text_of(seq), seq.is_finished)
        event = GenerationEvent(text, n)
        if seq.params.logprobs is not None:  # the entries of the tokens that make the text
            visible = min(len(seq.output_logprobs), len(self.engine.detokenizer.visible_tokens(seq)))
            event.logprobs, live.logprobs_sent = seq.output_logprobs[live.logprobs_sent : visible], visible
        if live.events_sent == 0:
            event.prompt_logprobs, event.cached_tokens = seq.prompt_logprobs, seq.num_cached_tokens
        live.events_sent += 1
        if seq.is_finished:
            del self._live[seq.request_id]
            event.finish_reason, event.error = seq.finish_reason, seq.error
            tpot = seq.time_per_output_token()
            self.metrics.observe_finished(seq.finish_reason, seq.num_prompt_tokens, n, tpot, live.adapter)
        _post(live.loop, live.stream.events.put_nowait, event)

    def _abort(self, request_id: str, reason: str, error: str | None = None) -> None:
        live = self._live.pop(request_id, None)
        if live is None:
            return
        self.engine.abort(request_id)
        seq = live.seq
        self.metrics.observe_finished(reason, seq.num_prompt_tokens, len(seq.output_token_ids), None, live.adapter)
        event = GenerationEvent("", len(seq.output_token_ids), reason, error=error)
        _post(live.loop, live.stream.events.put_nowait, event)


def _post(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """Run fn(*args) on the HTTP side's event loop; a loop already closed (shutdown) has no one to tell."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        if not loop.is_closed():
            raise


def _resolve(future: asyncio.Future, result: list[RequestStream] | None, error: BaseException | None) -> None:
    if future.done():  # the waiting coroutine was cancelled; it has queued an abort
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
