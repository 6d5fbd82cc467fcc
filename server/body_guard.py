"""The request body as the routes receive it: bounded in size and in time, and a client that leaves before
sending all of it is one log line, not a traceback.

An ASGI middleware rather than checks in the routes, because the routes see the body only once it is whole:
here a declared Content-Length over the limit is refused at the route's first read, before any of the body is
read, and a body sent in chunks (no Content-Length) is counted as it arrives and refused at the first byte past
the limit. The errors are raised where the route reads, so the app's error handler answers them as it answers
every other ServerError.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import BodyTimeoutError, BodyTooLargeError

log = logging.getLogger(__name__)


class BodyGuard:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout  # seconds from the request head to the body's last byte

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, self._guarded(receive, _content_length(scope)), send)
        except ClientDisconnect:  # raised where a route reads the body; the client is gone, nobody to answer
            host, port = scope.get("client") or ("?", 0)
            log.info("%s:%s %s %s: the client disconnected before sending the whole request body", host, port,
                     scope["method"], scope["path"])

    def _guarded(self, receive: Receive, declared: int | None) -> Receive:
        """`receive` that raises BodyTooLargeError when `declared` (the Content-Length) or the bytes received
        pass `max_bytes`, and BodyTimeoutError past the deadline, until the body's last message; after it (the
        wait for a disconnect) it is `receive` unchanged."""
        deadline = asyncio.get_running_loop().time() + self.timeout
        received = 0
        body_done = False

        async def guarded() -> Message:
            nonlocal received, body_done
            if body_done:
                return await receive()
            if declared is not None and declared > self.max_bytes:
                raise BodyTooLargeError(f"the request body has {declared} bytes, more than this server's limit of "
                                        f"{self.max_bytes} (--max-body-bytes)")
            left = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(left, 0))
            except asyncio.TimeoutError:
                raise BodyTimeoutError(f"the request body did not arrive within {self.timeout:g} s "
                                       "(--body-timeout)") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(f"the request body is over this server's limit of {self.max_bytes} "
                                            "bytes (--max-body-bytes)")
                body_done = not message.get("more_body", False)
            return message

        return guarded


def _content_length(scope: Scope) -> int | None:
    """The declared body size; the HTTP parser (httptools) has already refused a Content-Length that is not a number."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value)
    return None
