"""X-Request-Id: every HTTP response carries the client's own request id (as vLLM echoes it) or, when it sent none
or one that is not a short printable token, a new one. Routes read it as `request.state.request_id`; completion
ids and the engine's log lines are made from it, so one id follows a request from the client through the logs."""

from __future__ import annotations

import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
MAX_LENGTH = 128  # it goes into log lines and response ids: a client cannot make those unbounded


def _usable(value: bytes) -> bool:
    return 0 < len(value) <= MAX_LENGTH and all(0x21 <= byte <= 0x7E for byte in value)


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == HEADER), b"")
        request_id = given.decode("ascii") if _usable(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (HEADER, request_id.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)
