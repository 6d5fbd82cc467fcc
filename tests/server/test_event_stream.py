"""server.event_stream: a stream's events go out as sse-starlette sends them, without a cancel scope each."""

from __future__ import annotations

import anyio
import pytest
import sse_starlette.sse
from sse_starlette import EventSourceResponse

from server.event_stream import EventStream

EVENTS = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]


async def events():
    for event in EVENTS:
        yield event


async def serve(response: EventSourceResponse) -> list[dict]:
    """The ASGI messages `response` sends, the client never leaving."""
    sent: list[dict] = []
    left = anyio.Event()

    async def receive() -> dict:
        await left.wait()  # never set: the client stays
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await response({"type": "http", "method": "POST", "asgi": {"spec_version": "2.4"}}, receive, send)
    return sent


@pytest.fixture
def scopes(monkeypatch) -> list[float | None]:
    """The deadlines of the cancel scopes sse-starlette enters around a send."""
    entered: list[float | None] = []
    move_on_after = anyio.move_on_after

    def counted(delay, shield=False):
        entered.append(delay)
        return move_on_after(delay, shield=shield)

    monkeypatch.setattr(sse_starlette.sse.anyio, "move_on_after", counted)
    return entered


def bodies(sent: list[dict]) -> list[bytes]:
    return [m["body"] for m in sent if m["type"] == "http.response.body"]


def test_events_go_out_in_order_without_a_cancel_scope_each(scopes):
    sent = anyio.run(serve, EventStream(events(), ping=600))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert bodies(sent) == [*EVENTS, b""]
    assert scopes == []
    # the library's own response enters one a send: what the stream leaves out
    assert bodies(anyio.run(serve, EventSourceResponse(events(), ping=600))) == [*EVENTS, b""]
    assert scopes == [None] * len(EVENTS)


def test_with_a_send_timeout_each_event_is_sent_in_the_librarys_scope(scopes):
    sent = anyio.run(serve, EventStream(events(), ping=600, send_timeout=5.0))
    assert bodies(sent) == [*EVENTS, b""]
    assert scopes == [5.0] * len(EVENTS)


def test_a_send_that_fails_marks_the_response_interrupted_and_raises():
    response = EventStream(events(), ping=600)

    async def failing(message: dict) -> None:
        raise OSError("the client's socket closed")

    with pytest.raises(OSError):
        anyio.run(response._send_with_timeout, failing, {"type": "http.response.body", "body": b"x"})
    assert response._send_interrupted
