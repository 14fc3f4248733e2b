"""What a request must pass before a route sees it: the API key, or without one a Host header naming
this server (so a web page elsewhere cannot reach a loopback server through DNS rebinding), and a
bound on the body (a client cannot make the server read and parse more than a prompt of
max_input_length tokens could need).

FastAPI's own `max_body_size` answers in plain text; this one raises the HTTP 413 where the body is
read, so the route's error handler gives it the API's JSON error shape.
"""

from __future__ import annotations

import secrets

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atb_llm.entrypoints.openai.errors import error_body
from atb_llm.entrypoints.openai.metrics import Metrics


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` (by its Content-Length, or counted as it arrives)
    fails the request with 413 when the route reads it, before anything is parsed."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        received = int(declared) if declared.isdigit() else 0

        async def limited() -> Message:
            nonlocal received
            if received <= self.max_bytes:
                message = await receive()
                if message["type"] == "http.request" and not declared.isdigit():
                    received += len(message.get("body", b""))
                if received <= self.max_bytes:
                    return message
            raise HTTPException(413, f"the request body has {received} bytes or more")

        await self.app(scope, limited, send)


class ApiKey:
    """ASGI middleware: /v1 routes need `Authorization: Bearer KEY` (401 otherwise); the chat page,
    /health and /metrics stay open (the page sends the key it is given in its URL fragment)."""

    def __init__(self, app: ASGIApp, key: str, metrics: Metrics):
        self.app, self.expected, self.metrics = app, f"Bearer {key}".encode(), metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                self.metrics.observe_error(401)
                message = "missing or wrong API key; send the header 'Authorization: Bearer API_KEY'"
                body = error_body(401, message, code="invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def host_name(header: bytes) -> str:
    """The host of a Host header, without its port: "127.0.0.1:8000" -> "127.0.0.1", "[::1]:80" -> "::1"."""
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class HostCheck:
    """ASGI middleware for a server without an API key: a request whose Host header is not one of
    `allowed` (loopback names, the bound address and --allowed_hosts) gets 400, so that a page on
    another origin cannot use a name that resolves to this machine to drive the server."""

    def __init__(self, app: ASGIApp, allowed: set[str], metrics: Metrics):
        self.app, self.allowed, self.metrics = app, {h.lower() for h in allowed}, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = host_name(dict(scope["headers"]).get(b"host", b""))
            if host not in self.allowed:
                self.metrics.observe_error(400)
                message = (
                    f"Host {host[:64]!r} is not a name of this server; use one of {', '.join(sorted(self.allowed))}, "
                    "or start the server with --allowed_hosts NAME (or with --api_key)"
                )
                body = error_body(400, message, code="invalid_host")
                await JSONResponse(body, status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)
