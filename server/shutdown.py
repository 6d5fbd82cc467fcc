"""Graceful shutdown on SIGTERM or SIGINT: stop admitting, let the running requests finish, end the rest.

uvicorn's own handling closes the connections as soon as it can, sse-starlette then cuts every stream without
a last event, and uvicorn re-raises the signal at the end, so the process dies by it. Here instead:
1. the engine takes no new request (they get 503, and /health too, so a load balancer sends no more);
2. the requests already queued or running get up to --shutdown-timeout seconds to finish, so each stream ends
   with its last token and [DONE];
3. the engine stops: what still runs ends with an error event (then [DONE]), a non-streamed one with an
   error answer, each saying that the server shut down;
4. uvicorn closes the connections once those last answers are sent, and the process exits 0.
A second signal skips what is left of step 2. The other HTTP processes (--api-server-count) take no signal: they
exit once the engine has stopped (server.api_servers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Coroutine, Iterator
from typing import Any

import uvicorn

from .engine_pool import Engines

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)
SHUTDOWN_REASON = "the server shut down before this request finished (--shutdown-timeout)"
POLL_SECONDS = 0.05  # how often the drain checks whether the engine has finished its requests


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Engines, grace: float, follower: bool = False):
        super().__init__(config)
        self.engine = engine
        self.grace = grace  # seconds running requests get to finish
        self.follower = follower  # another HTTP process owns the shutdown: exit when the engine has stopped
        self._task: asyncio.Task | None = None  # the shutdown, once a signal started it
        self._hurry = asyncio.Event()  # set by a second signal: end the grace now

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM start `shut_down` instead of uvicorn's exit (only the main thread gets signals; a
        follower ignores them)."""
        if self.follower or threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self.shut_down)
        try:
            yield
        finally:
            for sig in SIGNALS:
                loop.remove_signal_handler(sig)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.follower and self.started:  # uvicorn's own lines do not name the process
            log.info("accepting connections")

    async def on_tick(self, counter: int) -> bool:
        if self.follower and not self.engine.alive:  # stopped by the first HTTP process's shutdown, or lost
            self.should_exit = True
        return await super().on_tick(counter)

    def shut_down(self) -> None:
        """Starts the graceful shutdown; called again while it runs, ends the grace at once. Event loop only."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._shut_down())
        else:
            self._hurry.set()

    async def _shut_down(self) -> None:
        deadline = asyncio.get_running_loop().time() + self.grace
        log.info("shutting down: no new requests; running ones get up to %g s to finish", self.grace)
        # admission closed (the engine answers once it has), then the running requests done: each within the grace
        if await self._within(self.engine.close(), deadline):
            await self._within(self._idle(), deadline)
        if self.engine.busy:
            log.warning("shutting down: the requests still running end with an error")
        await asyncio.to_thread(self.engine.stop, SHUTDOWN_REASON)
        self.should_exit = True  # uvicorn closes the connections once their answers are sent

    async def _within(self, work: Coroutine[Any, Any, None], deadline: float) -> bool:
        """Whether `work` finished before `deadline` (loop time) and before a second signal."""
        tasks = [asyncio.ensure_future(work), asyncio.ensure_future(self._hurry.wait())]
        timeout = max(0.0, deadline - asyncio.get_running_loop().time())
        done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        return tasks[0] in done

    async def _idle(self) -> None:
        while self.engine.busy:
            await asyncio.sleep(POLL_SECONDS)
