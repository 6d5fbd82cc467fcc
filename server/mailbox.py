"""Outputs handed from the engine's receiving thread (server.engine_client) to the event loop: each submission's
in a mailbox, merged per choice while they wait; the loop woken once for all the mailboxes a hand-over filled.

The receiving thread puts each output of each choice; the response takes everything put since its last take, one
output per choice: when a reader falls behind the engine (a slow client, a busy event loop), the outputs of
several engine steps reach it as one, so it sends one chunk for them instead of one per token, and catches up.
Only a put into an empty mailbox asks for a wake-up: while the reader is behind, the receiving thread adds to
what waits without waking anyone. The wake-ups go through the loop's `Doorbell`, one call into the loop for all those
asked between two of its rounds.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from functools import partial

from .request import RequestOutput


class Doorbell:
    """Sets asyncio events of one loop from other threads. The first `ring` after a round schedules the next
    round (`call_soon_threadsafe`: a write to the loop's wake-up pipe); the rings before it runs join it. The
    receiving thread puts a hand-over's outputs (an engine step's) holding the interpreter, so they reach the loop
    in one round."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._due: list[asyncio.Event] = []

    def ring(self, event: asyncio.Event) -> None:
        """Sets `event` in the loop's thread, soon; called from any thread."""
        with self._lock:
            self._due.append(event)
            if len(self._due) > 1:  # a round is scheduled and has not run yet: it sets this one too
                return
        try:
            self._loop.call_soon_threadsafe(self._round)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _round(self) -> None:
        with self._lock:
            due, self._due = self._due, []
        for event in due:
            event.set()


class Mailbox:
    """One submission's outputs, put on the receiving thread and taken in the event loop's."""

    def __init__(self, doorbell: Doorbell) -> None:
        self._doorbell = doorbell
        self._lock = threading.Lock()
        self._held: dict[int, RequestOutput] = {}  # choice index → its outputs since the last take, merged
        self._ready = asyncio.Event()  # set (in the loop's thread) once something is held
        self._rung = False  # a wake-up was asked for since the last take

    def sink(self, index: int) -> Callable[[RequestOutput], None]:
        """The sink of choice `index`'s engine request."""
        return partial(self.put, index)

    def put(self, index: int, output: RequestOutput) -> None:
        """Adds choice `index`'s next output; called on the receiving thread."""
        with self._lock:
            held = self._held.get(index)
            if held is None:
                self._held[index] = output
            else:
                held.extend(output)
            if self._rung:
                return
            self._rung = True
        self._doorbell.ring(self._ready)

    async def take(self) -> list[tuple[int, RequestOutput]]:
        """Waits until something is held, then takes it all: (choice index, its outputs merged) in the order
        each choice's first output came."""
        await self._ready.wait()
        with self._lock:
            held, self._held = self._held, {}
            self._ready.clear()
            self._rung = False
        return list(held.items())
