"""The response of a streamed request: sse-starlette's server-sent events, each event sent without a cancel scope.

sse-starlette sends every event inside `anyio.move_on_after(send_timeout)`, a cancel scope even when there is no
timeout (the server sets none); entering and leaving it costs more of the HTTP process's time than sending a
token's chunk. Without a timeout this response sends the event directly, keeping the library's book of a send
that was interrupted; with one, the library's own path.
"""

from __future__ import annotations

from sse_starlette import EventSourceResponse
from starlette.types import Message, Send


class EventStream(EventSourceResponse):
    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is not None:
            await super()._send_with_timeout(send, message)
            return
        try:
            await send(message)
        except BaseException:
            self._send_interrupted = True
            raise
