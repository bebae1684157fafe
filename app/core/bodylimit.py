"""Request body limit (MOPEQ_MAX_BODY_BYTES) as a pure ASGI middleware.

A declared ``Content-Length`` over the limit is answered at once with the API's JSON error (413 ``too_large``),
without reading the body; a body without one (chunked) is counted while it is read and refused the moment it passes
the limit, so the server never buffers more than the limit. (Starlette's own limiter answers plain text.)

Request headers over ``MAX_HEADER_BYTES`` in all are answered 431: uvicorn's httptools parser (the fast one the
service runs) sets no bound of its own, unlike h11's."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_HEADER_BYTES = 64 * 1024  # every header name and value together; browsers and proxies send far less


async def _refuse(send: Send, status: int, detail: str, code: str) -> None:
    body = json.dumps({"detail": detail, "code": code}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _message(self) -> str:
        return f"the request body is over the limit of {self.max_bytes} bytes (MOPEQ_MAX_BODY_BYTES)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared, header_bytes = None, 0
        for k, v in scope.get("headers", ()):
            header_bytes += len(k) + len(v)
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    declared = None
        if header_bytes > MAX_HEADER_BYTES:
            await _refuse(send, 431, f"the request headers are over the limit of {MAX_HEADER_BYTES} bytes",
                          "headers_too_large")
            return
        if declared is not None and declared > self.max_bytes:
            await _refuse(send, 413, self._message(), "too_large")
            return
        total = 0

        async def limited() -> Message:
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_bytes:
                    raise HTTPException(413, self._message())  # -> the app's handler: the JSON error
            return message

        await self.app(scope, limited, send)
