"""Routes: the OpenAI-compatible API, health, metrics, and the chat page at `/`."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask

from atb_llm.entrypoints.openai import generation as gen
from atb_llm.entrypoints.openai import streaming
from atb_llm.entrypoints.openai.engine_loop import EngineLoop
from atb_llm.entrypoints.openai.errors import APIError, install_error_handlers
from atb_llm.entrypoints.openai.limits import LOOPBACK_NAMES, ApiKey, BodyLimit, HostCheck
from atb_llm.entrypoints.openai.logprobs import TokenTexts
from atb_llm.entrypoints.openai.prompts import PromptEncoder
from atb_llm.entrypoints.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    SamplingFields,
)
from atb_llm.models.base.lora import BASE
from atb_llm.runtime.request_limits import short

STATIC = Path(__file__).parent / "static"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
router = APIRouter()


@dataclass
class Served:
    """What the routes serve: the engine loop, its prompt encoder and the model's public name."""

    loop: EngineLoop
    encoder: PromptEncoder
    texts: TokenTexts
    model_name: str
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.max_model_len = self.loop.engine.limits.max_sequence_tokens  # the longest prompt + answer

    @property
    def model_ids(self) -> list[str]:
        """The base model's name, then every LoRA adapter's (a request's `model` picks one)."""
        return [self.model_name] + [a for a in self.loop.engine.adapters if a != BASE]

    def check_model(self, name: str | None) -> str | None:
        """The LoRA adapter `name` asks for (None: the base model); 404 for a name nobody serves."""
        if name is None or name == self.model_name:
            return None
        if name not in self.model_ids:
            raise APIError(
                404,
                f"model {short(name)} does not exist; this server serves {self.model_ids} (see GET /v1/models)",
                "model",
                "model_not_found",
            )
        return name

    def model_card(self, model_id: str) -> dict:
        card = dict(
            id=model_id,
            object="model",
            created=self.created,
            owned_by="atb_llm",
            max_model_len=self.max_model_len,
            root=model_id,
            parent=None,
        )
        if model_id != self.model_name:  # a LoRA adapter: its base, as vLLM lists them
            card |= dict(root=str(self.loop.engine.adapter_paths[model_id]), parent=self.model_name)
        return card


def create_app(loop: EngineLoop, model_name: str, api_key: str | None = None, hosts: set[str] | None = None) -> FastAPI:
    """The server around a started EngineLoop; `model_name` is what /v1/models lists; with `api_key`,
    every /v1 route wants `Authorization: Bearer API_KEY` (as vLLM's --api-key); without one, only
    requests whose Host is one of `hosts` (default: the loopback names) are served."""
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty; give a non-empty --api_key, or leave the flag out (loopback only)")
    if model_name in loop.engine.adapters:
        raise ValueError(f"a LoRA adapter is named {model_name!r} like the served model; rename the adapter")
    encoder = PromptEncoder(loop.engine)
    app = FastAPI(title="atb_llm OpenAI-compatible server", docs_url=None, redoc_url=None)
    app.state.served = Served(loop, encoder, TokenTexts(encoder.tokenizer), model_name, api_key)
    install_error_handlers(app, loop.metrics)
    if api_key:
        app.add_middleware(ApiKey, key=api_key, metrics=loop.metrics)
    else:
        app.add_middleware(HostCheck, allowed=set(LOOPBACK_NAMES) | (hosts or set()), metrics=loop.metrics)
    app.add_middleware(BodyLimit, max_bytes=encoder.max_body_bytes())  # 413 before a body no prompt needs is read
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(router)
    return app


def served(request: Request) -> Served:
    return request.app.state.served


async def generate(
    request: Request, body: SamplingFields, prompts: list, max_tokens: int | None, shape: gen.Shape
) -> tuple[list[list[gen.Answer]], int] | Response:
    """Submit `best_of` samples of each prompt (siblings: the prompt is computed once); then the
    event stream (one prompt, one sample), or the n best answers of each prompt and the tokens
    generated in all (a bare 499 if the client left)."""
    s = served(request)
    adapter = s.check_model(body.model)
    n, best_of = body.n, getattr(body, "best_of", None) or body.n
    if body.stream and len(prompts) > 1:
        raise APIError(422, f"stream takes one prompt; got {len(prompts)}", "prompt", "invalid_value")
    if body.stream and best_of > n:
        raise APIError(
            400,
            f"stream with best_of={best_of} > n={n} is not supported (the best are known only at the end); "
            "ask without stream",
            "best_of",
            "unsupported_parameter",
        )
    request_id = f"{'chatcmpl' if shape.chat else 'cmpl'}-{uuid.uuid4().hex}"
    k = shape.logprobs
    params = gen.sampling_params(body, max_tokens, s.loop.engine.limits, k, k if shape.echo and k is not None else None)
    streams = []
    try:
        for i, prompt in enumerate(prompts):
            rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            param = "messages" if shape.chat else "prompt"
            samples = gen.samples(params, n, best_of)
            streams += await gen.submit(s.loop, s.encoder, rid, prompt, samples, param, adapter)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            name = body.model or s.model_name
            fmts = [streaming.ChunkFormat(request_id, name, shape, include_usage, j) for j in range(n)]
            return StreamingResponse(
                streaming.event_stream(s.loop, streams, fmts, prompts[0]),
                media_type="text/event-stream",
                headers=SSE_HEADERS,
                background=BackgroundTask(gen.abort_all, s.loop, streams),  # runs after a disconnect too
            )
        tasks = [asyncio.ensure_future(gen.collect(s.loop, st, request)) for st in streams]
        try:
            answers = list(await asyncio.gather(*tasks))
        finally:  # one prompt failed: stop waiting for the others
            for task in tasks:
                task.cancel()
        per_prompt = [answers[i : i + best_of] for i in range(0, len(answers), best_of)]
        return [gen.best(a, n) for a in per_prompt], sum(a.num_output_tokens for a in answers)
    except gen.ClientGone:
        return Response(status_code=499)
    finally:  # a failure (or a departed client) of one prompt ends the others; finished ones are ignored
        if not body.stream or not streams:
            for st in streams:
                gen.abort_unfinished(s.loop, st)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    shape = gen.Shape(served(request).texts, chat=True, logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    out = await generate(request, body, [body.chat()], body.max_completion_tokens or body.max_tokens, shape)
    if isinstance(out, Response):
        return out
    ([*answers],), generated = out
    choices = [
        ChatChoice(
            index=j,
            message=AssistantMessage(content=a.text),
            logprobs=shape.chat_logprobs(a.logprobs),
            finish_reason=a.finish_reason,
        )
        for j, a in enumerate(answers)
    ]
    usage = shape.usage(len(answers[0].prompt_ids), generated, max(a.cached_tokens for a in answers))
    request_id = "-".join(answers[0].request_id.split("-")[:2])  # n > 1: request ids ID-0, ID-1, ...
    return ChatCompletion(id=request_id, model=body.model or served(request).model_name, choices=choices, usage=usage)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    if body.max_tokens == 0 and not body.echo:
        raise APIError(
            422,
            "max_tokens=0 returns nothing without echo=true; ask for at least 1 token",
            "max_tokens",
            "invalid_value",
        )
    shape = gen.Shape(served(request).texts, logprobs=body.logprobs, echo=body.echo, score_only=body.max_tokens == 0)
    prompts = body.prompts()
    out = await generate(request, body, prompts, body.max_tokens, shape)
    if isinstance(out, Response):
        return out
    answers, generated = out
    choices = [  # n choices per prompt, prompt by prompt (OpenAI's order)
        shape.completion_choice(i * body.n + j, p, a) for i, (p, best) in enumerate(zip(prompts, answers))
        for j, a in enumerate(best)
    ]  # fmt: skip
    cached = sum(max(a.cached_tokens for a in best) for best in answers)  # per prompt: its samples share one
    usage = shape.usage(sum(len(best[0].prompt_ids) for best in answers), generated, cached)
    request_id = answers[0][0].request_id.split("-")[:2]  # several prompts or samples: ID-i, ID-i-j
    model = body.model or served(request).model_name
    return Completion(id="-".join(request_id), model=model, choices=choices, usage=usage)


@router.get("/v1/models")
async def models(request: Request) -> dict:
    s = served(request)
    return dict(object="list", data=[s.model_card(m) for m in s.model_ids])


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> dict:
    s = served(request)
    s.check_model(model_id)
    return s.model_card(model_id)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    s = served(request)
    if not s.loop.alive:
        return JSONResponse(dict(status="error", detail="the engine thread has stopped"), status_code=503)
    return JSONResponse(dict(status="ok", model=s.model_name))


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    loop = served(request).loop
    return PlainTextResponse(loop.metrics.render(loop.stats), media_type="text/plain; version=0.0.4")


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html")
