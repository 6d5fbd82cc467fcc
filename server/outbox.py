"""Outputs from the engine thread to an event loop, handed over in one wake-up for all those of an engine step.

`asyncio.AbstractEventLoop.call_soon_threadsafe` wakes the loop (a write to its self-pipe) on every call: one per
stream and token is one system call on the engine thread and one wake-up of the loop each, where a step of 16
sequences needs one. The first output put after a hand-over schedules the next one; those put before it runs
join it, so a step's outputs reach their queues together, in the order they were put.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import Any


class Outbox:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[Any], Any]] = []

    def put(self, queue: asyncio.Queue[Any], item: Any) -> None:
        """Puts `item` on `queue` in the loop's thread, soon; called from any thread. Raises RuntimeError when
        the loop is closed."""
        with self._lock:
            self._pending.append((queue, item))
            if len(self._pending) > 1:  # a hand-over is already scheduled and has not run yet
                return
        self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, item in pending:
            queue.put_nowait(item)


_outboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Outbox] = weakref.WeakKeyDictionary()


def outbox(loop: asyncio.AbstractEventLoop) -> Outbox:
    """The loop's outbox (one per loop); call it in the loop's thread."""
    if loop not in _outboxes:
        _outboxes[loop] = Outbox(loop)
    return _outboxes[loop]
