"""Replicas of the server on Ray Serve: one engine per replica, behind Ray Serve's HTTP proxy.

    python -m atb_llm.entrypoints.openai.ray_serve -m WEIGHT_DIR --replicas 2 [--port 8000]
    python -m atb_llm.entrypoints.openai.ray_serve -m WEIGHT_DIR --min_replicas 1 --max_replicas 4
    serve run atb_llm.entrypoints.openai.ray_serve:app model_path=WEIGHT_DIR replicas=2   (or a config file)

Ray Serve does the machinery: replicas, the HTTP proxy, autoscaling on ongoing requests, health
checks (a replica whose engine thread stopped fails its check and is replaced), graceful drain on
scale-down (in-flight streams finish), restarts. This module adds two deployments:

- `Engine`: one engine thread and the single server's whole app (the same routes, streaming,
  error bodies, chat page and /metrics), called in-process through ASGI; a replica takes at most
  max_batch_size requests at once (`max_ongoing_requests`), so one at its batch limit is sent no more.
- `Ingress`: the HTTP entry. It reads the prompt or messages of a generation request and calls an
  Engine replica through a handle whose router is Ray's prefix-aware one (requests whose prompts
  share a prefix go to the replica that served it, falling back to the least loaded); everything
  else (GET routes) is routed by load alone. The response streams back chunk by chunk, with the
  replica's id in `x-atb-replica`.

On one machine it starts a local Ray cluster (or joins `ray start --head`); on a multi-node
cluster, run it (or `serve deploy`) against the cluster's address: nothing changes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, fields
from pathlib import Path

from ray import serve
from ray.serve.config import RequestRouterConfig
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from atb_llm.entrypoints.openai.app import create_app
from atb_llm.entrypoints.openai.errors import error_body
from atb_llm.entrypoints.openai.limits import LOOPBACK_NAMES
from atb_llm.entrypoints.openai.serve import SERVER_DEFAULTS, start_engine_loop
from atb_llm.runtime.engine import EngineConfig
from atb_llm.utils.default_model import resolve_model_path

ROUTERS = {  # --router: Ray's prefix-aware router, or its default (two random replicas, the less loaded)
    "prefix": "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router:PrefixCacheAffinityRouter",
    "load": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",
}
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")


@dataclass
class Routed:
    """What the prefix-aware router reads of a request: its prompt; other routes carry their path,
    so every call has a text to route by. (The router looks for a `messages` attribute first:
    chat requests come as RoutedChat.)"""

    prompt: object

    @classmethod
    def of(cls, path: str, body: bytes) -> Routed | RoutedChat:
        if path in GENERATION_ROUTES:
            try:
                data = json.loads(body or b"null")
            except ValueError:
                data = None
            if isinstance(data, dict) and data.get("messages"):
                return RoutedChat(data["messages"])
            if isinstance(data, dict) and data.get("prompt"):
                return cls(data["prompt"])
        return cls(path)


@dataclass
class RoutedChat:
    messages: object


class Engine:
    """One engine replica: the single server's app around its own engine thread."""

    def __init__(self, cfg: dict, name: str, api_key: str | None = None):
        self.loop = start_engine_loop(EngineConfig(**cfg))
        self.app = create_app(self.loop, name, api_key)
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def handle(
        self, routed: Routed | RoutedChat, method: str, path: str, query: bytes, headers: list, body: bytes
    ):
        """Calls the app in-process; yields (status, headers), then the body's chunks as they come."""
        del routed  # read by the router only
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
            "raw_path": path.encode(), "query_string": query, "root_path": "", "scheme": "http",
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80),
        }  # fmt: skip
        sent, gone, queue = False, asyncio.Event(), asyncio.Queue()

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()  # the caller went away: tell the app, which aborts the request
            return {"type": "http.disconnect"}

        task = asyncio.ensure_future(self.app(scope, receive, queue.put))
        try:
            while True:
                msg = await queue.get()
                if msg["type"] == "http.response.start":
                    head = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in msg.get("headers", [])]
                    yield msg["status"], head + [("x-atb-replica", self.replica)]
                elif msg["type"] == "http.response.body":
                    if msg.get("body"):
                        yield msg["body"]
                    if not msg.get("more_body"):
                        break
            await task
        finally:
            gone.set()
            if not task.done():
                await asyncio.wait({task}, timeout=5)

    def check_health(self) -> None:
        """Ray Serve calls this periodically: a replica whose engine stopped is replaced."""
        if self.loop.failure or not self.loop.alive:
            raise RuntimeError(f"the engine thread stopped: {self.loop.failure or 'not running'}")

    def __del__(self):
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.stop()


class Ingress:
    """The HTTP entry: forwards every request to an Engine replica and streams its answer back. A
    replica lost mid-answer ends the answer with the single server's error event (a stream) or a
    503 (before the answer started), never a hang."""

    def __init__(self, engines):
        self.engines = engines.options(stream=True)

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() != "host"] + [("host", "127.0.0.1")]
        answer = self.engines.handle.remote(
            Routed.of(request.url.path, body), request.method, request.url.path, request.url.query.encode(),
            headers, body,
        )  # fmt: skip
        try:
            status, head = await answer.__anext__()
        except Exception as e:  # the replica died before answering
            return JSONResponse(error_body(503, lost(e), code="replica_lost"), status_code=503)
        head = {k: v for k, v in head if k.lower() != "content-length"}
        stream = head.get("content-type", "").startswith("text/event-stream")

        async def rest():
            try:
                async for chunk in answer:
                    yield chunk
            except Exception as e:  # the replica died mid-answer
                if not stream:
                    raise
                yield f"data: {json.dumps(error_body(503, lost(e), code='replica_lost'))}\n\ndata: [DONE]\n\n"

        return StreamingResponse(rest(), status_code=status, headers=head)


def lost(e: BaseException) -> str:
    return f"the replica serving this request was lost ({type(e).__name__}); retry: another replica takes it"


def build(
    cfg: EngineConfig,
    name: str | None = None,
    replicas: int = 1,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    api_key: str | None = None,
    replica_cpus: float = 1.0,
    graceful_shutdown_s: float = 60.0,
    downscale_delay_s: float = 30.0,
    router: str = "prefix",
):
    """The Ray Serve application: Ingress -> Engine replicas (fixed, or autoscaled between
    min_replicas and max_replicas on ongoing requests per replica)."""
    name = name or Path(cfg.model_path).name
    options = dict(
        max_ongoing_requests=cfg.max_batch_size,  # a replica at its batch limit is sent no more
        ray_actor_options={"num_cpus": replica_cpus},
        health_check_period_s=2,
        graceful_shutdown_timeout_s=graceful_shutdown_s,  # scale-down waits for in-flight streams
        request_router_config=RequestRouterConfig(request_router_class=ROUTERS[router]),
    )
    if min_replicas is not None or max_replicas is not None:
        lo = min_replicas if min_replicas is not None else 1
        options["autoscaling_config"] = dict(
            min_replicas=lo,
            max_replicas=max(lo, max_replicas if max_replicas is not None else lo),
            target_ongoing_requests=max(1, cfg.max_batch_size // 2),
            upscale_delay_s=2,
            downscale_delay_s=downscale_delay_s,
        )
    else:
        options["num_replicas"] = replicas
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    engine = serve.deployment(Engine, name="Engine", **options).bind(values, name, api_key)
    ingress = serve.deployment(Ingress, name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    return ingress.bind(engine)


def app(args: dict):
    """`serve run atb_llm.entrypoints.openai.ray_serve:app model_path=W replicas=2 ...` (or a config
    file's `args:`): the flags of this command by name (true for a switch)."""
    flags = []
    for k, v in args.items():
        flags += [f"--{k}"] if v is True or v == "true" else [f"--{k}", str(v)]
    return application(parse_args(flags))


def application(args: argparse.Namespace):
    cfg = EngineConfig.from_cli_args(args, model_path=str(resolve_model_path(args.model_path)))
    return build(cfg, args.served_model_name, args.replicas, args.min_replicas, args.max_replicas, args.api_key,
                 args.replica_cpus, router=args.router)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m atb_llm.entrypoints.openai.ray_serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served_model_name", default=None, help="name in /v1/models (default: the folder's name)")
    p.add_argument("--api_key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--replicas", type=int, default=1, help="engines (fixed count)")
    p.add_argument("--min_replicas", type=int, default=None, help="autoscale: at least this many")
    p.add_argument("--max_replicas", type=int, default=None, help="autoscale: at most this many")
    p.add_argument("--replica_cpus", type=float, default=1.0, help="CPUs Ray reserves per replica")
    p.add_argument("--address", default=None, help="a Ray cluster's address (default: start a local one)")
    p.add_argument("--router", default="prefix", choices=sorted(ROUTERS), help="prefix-aware, or by load alone")
    EngineConfig.add_cli_args(p, **SERVER_DEFAULTS, prefix_caching=True)  # what prefix-aware routing is for
    return p.parse_args(argv)


def start_ray(**init) -> None:
    """ray.init, giving Serve's HTTP proxy a minute to come up (Ray's own 5 s is short for a CPU
    machine that is also loading models: the proxy is killed and the start fails)."""
    import os

    import ray

    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")  # Ray's setting, read by its processes
    ray.init(**init)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.host not in LOOPBACK_NAMES and not args.api_key:
        raise SystemExit(f"--host {args.host} serves other machines: give --api_key KEY (sent as a Bearer token)")
    start_ray(address=args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application(args), name="atb_llm", route_prefix="/")
    print(f"[ray serve] OpenAI API at http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
