"""A bound on the request body: a client cannot make the server read (and parse) more than a
prompt of max_input_length tokens could need.

FastAPI's own `max_body_size` answers in plain text; this one raises the HTTP 413 where the body is
read, so the route's error handler gives it the API's JSON error shape.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


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
            if received > self.max_bytes:
                raise HTTPException(413, f"the request body has {received} bytes or more")
            message = await receive()
            if message["type"] == "http.request" and not declared.isdigit():
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, f"the request body has {received} bytes or more")
            return message

        await self.app(scope, limited, send)
