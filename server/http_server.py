"""The HTTP server around the app: uvicorn with httptools on asyncio, time-outs for slow clients, a connection
limit and the graceful shutdown. `python -m server` and the tests' live servers are built here alike."""

from __future__ import annotations

import asyncio
import functools
import logging

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .config import HttpConfig
from .shutdown import GracefulServer

log = logging.getLogger(__name__)
# After the shutdown's grace, seconds the last answers get to reach their clients before uvicorn drops them.
FLUSH_SECONDS = 5


class HeadTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for each request head: a connection that has not sent a complete
    head within `head_timeout` seconds of opening, or of its previous response, is closed. uvicorn alone never
    closes a connection that has sent nothing yet, and its keep-alive timer stops at the first byte, so idle or
    trickling clients would hold connections (and file descriptors) for ever. The body's time is the app's
    (server.body_guard)."""

    def __init__(self, *args, head_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_timeout = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.head_timeout, self._expire)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expire(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request head arrived in time and is being answered
        if not self.transport.is_closing():
            host, port = self.client or ("?", 0)
            log.info("%s:%s: no complete request head within %g s (--header-timeout): connection closed", host,
                     port, self.head_timeout)
            self.transport.close()


def build_server(app: FastAPI, http: HttpConfig, log_level: str = "info", follower: bool = False) -> GracefulServer:
    """The server of `app` (built by server.app.build_app, whose engine it shuts down gracefully; a `follower`,
    an HTTP process that did not launch the engines, exits once they have stopped: server.api_servers)."""
    # uvicorn calls `http` to make each connection's protocol, so a factory serves; its stubs ask for a class
    protocol = functools.partial(HeadTimeoutProtocol, head_timeout=http.header_timeout)
    config = uvicorn.Config(app, host=http.host, port=http.port, log_level=log_level,
                            # not uvloop, even where installed: its ordering let sse-starlette's heartbeat
                            # task send a ping after a stream's [DONE] (2 runs in 6 with a 2 ms heartbeat)
                            http=protocol, loop="asyncio",  # type: ignore[arg-type]
                            limit_concurrency=http.max_connections, timeout_graceful_shutdown=FLUSH_SECONDS,
                            ssl_keyfile=http.ssl_keyfile, ssl_certfile=http.ssl_certfile, access_log=http.access_log)
    return GracefulServer(config, app.state.engine, http.shutdown_timeout, follower)
