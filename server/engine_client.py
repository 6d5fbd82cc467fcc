"""The engine as the HTTP side sees it: a process of its own (server.engine_process), reached over one
connection (server.engine_protocol).

`EngineClient.wait` waits until a launched process's model is loaded and warmed up. The HTTP process that
launched the engine owns it (its `stop` stops it); another HTTP process (--api-server-count) only leaves it. A
receiver thread takes each hand-over and routes its outputs to the sinks the requests were submitted with (the
outputs of a whole engine step in one message), resolves the calls that were waiting for a reply, and keeps the
engine's last status (`alive`, `busy`, `free_slots`, `waiting`, `accepting`). The engine process's faults come
back as outputs: a request it could not run ends with an error, and if the process dies every request still
running ends so.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from .config import EngineConfig
from .engine import StepRecord
from .engine_protocol import (Abort, Close, EngineRequest, EngineStatus, HandOver, HttpMessage, ModelInfo, Query,
                              Ready, Reply, StartFailed, Stop, Stopped, Submit)
from .errors import UnavailableError
from .request import RequestOutput, RequestStatus

log = logging.getLogger(__name__)
Sink = Callable[[RequestOutput], None]
STOP_SECONDS = 60  # how long `stop` waits for the engine process to hand over its last outputs and exit
LOST = "the engine process exited"
LEFT = "the server's HTTP process stopped"  # what a leaving HTTP process's requests still running are told
STOPPED = EngineStatus(alive=False, busy=False, free_slots=0, waiting=0)


class EngineStartError(Exception):
    """The engine process could not start; the message says why."""


class EngineClient:
    def __init__(self, process: BaseProcess | None, connection: Connection, ready: Ready,
                 keys: Iterator[int] | None = None) -> None:
        """`process`: the engine process where this HTTP process launched it; None where another did."""
        self.model: ModelInfo = ready.model
        self.config: EngineConfig = ready.engine  # its slots sized
        self.status: EngineStatus = ready.status
        self._process = process
        self._connection = connection
        self._send_lock = threading.Lock()
        self._routes: dict[int, tuple[str, Sink]] = {}  # the unfinished requests' ids and sinks, by key
        self._keys = itertools.count() if keys is None else keys  # shared by a pool's engines (server.engine_pool)
        self._calls: dict[int, concurrent.futures.Future] = {}  # calls waiting for their reply, by number
        self._numbers = itertools.count()
        self._closed = False  # admission closed (a graceful shutdown)
        self._stopped = threading.Event()  # Stopped received, or the connection lost
        self._receiver = threading.Thread(target=self._receive, name="engine-receiver", daemon=True)
        self._receiver.start()
        atexit.register(self.stop)  # runs before multiprocessing's exit handler, which waits for the process

    @classmethod
    def wait(cls, process: BaseProcess | None, connection: Connection,
             keys: Iterator[int] | None = None) -> EngineClient:
        """The client of a launched engine process (server.engine_launch), once it is ready, numbering its
        requests with `keys`. Raises EngineStartError with its message when it cannot start."""
        try:
            first = connection.recv()
        except EOFError:
            if process is None:
                raise EngineStartError("the engine process exited before it was ready") from None
            process.join()
            raise EngineStartError(f"the engine process exited (code {process.exitcode}) before it was ready") from None
        except BaseException:  # interrupted (Ctrl-C) while it loads: it ignores the signal, and would wait for us
            if process is not None:
                process.kill()
                process.join()
            raise
        if isinstance(first, StartFailed):
            if process is not None:
                process.join()
            raise EngineStartError(first.message)
        assert isinstance(first, Ready), f"unexpected first message {first!r}"
        return cls(process, connection, first, keys)

    @property
    def pid(self) -> int | None:
        """The engine process's id (operators tell the processes apart by it); None where another HTTP process
        launched it."""
        return None if self._process is None else self._process.pid

    # --- the engine's state, as of its last hand-over ---------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.status.alive and not self._stopped.is_set()

    @property
    def accepting(self) -> bool:
        return self.alive and not self._closed and self.status.accepting

    @property
    def busy(self) -> bool:
        """Some request is queued or running."""
        return self.status.busy

    @property
    def free_slots(self) -> int:
        return self.status.free_slots

    @property
    def waiting(self) -> int:
        return self.status.waiting

    @property
    def unfinished(self) -> int:
        """Requests submitted here and not finished: queued, prefilling or decoding (known at once, where the
        engine's own counts come with its next hand-over)."""
        return len(self._routes)

    # --- requests ------------------------------------------------------------------------------------------------

    async def submit(self, requests: list[EngineRequest], sinks: dict[str, Sink]) -> None:
        """Queues all of `requests` (with their forks, their ids distinct), each request's outputs to go to
        `sinks[request_id]`; gives each its key. Raises the engine's ServerError (QueueFullError,
        UnavailableError), queueing none, when it refuses them."""
        if not self.alive:
            raise UnavailableError("the engine is not running")
        if self._closed:
            raise UnavailableError("the server is shutting down", code="shutting_down")
        members = [member for request in requests for member in request.group]
        for member in members:
            member.key = next(self._keys)
            self._routes[member.key] = (member.request_id, sinks[member.request_id])
        try:
            await asyncio.wrap_future(self._call(lambda call: Submit(call, requests)))
        except asyncio.CancelledError:  # the client went away while the engine queued them
            self.abort(*members)
            raise
        except Exception:
            for member in members:
                self._routes.pop(member.key, None)
            raise

    def abort(self, *requests: EngineRequest) -> None:
        """Cancels the requests (no-op for those finished); their slots are freed at the engine's next step."""
        unfinished = [request.key for request in requests if request.key in self._routes]
        if unfinished:
            self._send(Abort(unfinished))

    # --- queries -------------------------------------------------------------------------------------------------

    async def metrics(self) -> bytes:
        """The engine's Prometheus exposition."""
        exposition: bytes = await asyncio.wrap_future(self._call(lambda call: Query(call, "metrics")))
        return exposition

    @property
    def step_log(self) -> list[StepRecord]:
        """The engine's last steps, oldest first (tests and debugging read it; it waits for the engine process's
        answer, so not in the event loop)."""
        records: list[StepRecord] = self._call(lambda call: Query(call, "steps")).result(timeout=STOP_SECONDS)
        return records

    # --- life cycle ----------------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Takes no more requests (a graceful shutdown); those already queued or running go on. Returns once the
        engine has closed, its status (`busy`) then counting every HTTP process's requests."""
        self._closed = True
        try:
            await asyncio.wrap_future(self._call(lambda call: Close(call)))
        except UnavailableError:  # the engine has stopped already
            pass

    def stop(self, reason: str | None = None) -> None:
        """Stops the engine: every request still queued or running ends with an error saying `reason`; returns
        once the engine process has handed those outputs over and exited. Blocks: not in the event loop.
        Where another HTTP process launched the engine, this one leaves it instead: its own requests end so (the
        engine process aborts them when the connection closes) and the engine serves on."""
        if self._process is None:
            self._end_all(reason or LEFT)
            self._connection.close()
            atexit.unregister(self.stop)
            return
        if not self._stopped.is_set():
            self._send(Stop(reason))
            if not self._stopped.wait(STOP_SECONDS):
                log.warning("the engine process did not stop within %d s: killed", STOP_SECONDS)
                self._process.kill()
        self._process.join(STOP_SECONDS)
        self._receiver.join(STOP_SECONDS)
        self._connection.close()
        atexit.unregister(self.stop)

    # --- the connection ------------------------------------------------------------------------------------------

    def _call(self, message: Callable[[int], HttpMessage]) -> concurrent.futures.Future:
        """Sends `message(call number)`; the future gets the reply's value, or its error."""
        call = next(self._numbers)
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._stopped.is_set():
            future.set_exception(UnavailableError("the engine is not running"))
            return future
        self._calls[call] = future
        self._send(message(call))
        return future

    def _send(self, message: HttpMessage) -> None:
        try:
            with self._send_lock:
                self._connection.send(message)
        except OSError:  # the engine process is gone: its requests end with an error through `_lost`
            log.warning("the engine process is gone: %s not sent", type(message).__name__)

    def _receive(self) -> None:
        while True:
            try:
                message = self._connection.recv()
            except (EOFError, OSError):
                self._lost()
                return
            if isinstance(message, Stopped):
                self.status = STOPPED
                self._stopped.set()
                return
            assert isinstance(message, HandOver), f"unexpected message {message!r}"
            self.status = message.status  # first: a client told of an output may read the state that came with it
            for key, output in message.outputs:
                route = self._routes.pop(key, None) if output.finished else self._routes.get(key)
                if route is not None:
                    _deliver(route[1], output)
            for reply in message.replies:
                self._answer(reply)

    def _answer(self, reply: Reply) -> None:
        _settle(self._calls.pop(reply.call), reply.value, reply.error)

    def _lost(self) -> None:
        """The connection closed without Stopped: the engine process died. Every request still running ends
        with an error, and every call waiting for a reply fails."""
        if self._stopped.is_set():
            return
        log.error("%s (code %s)", LOST, None if self._process is None else self._process.exitcode)
        self._end_all(LOST)

    def _end_all(self, reason: str) -> None:
        """This side ends every request still running with an error saying `reason`, and every call waiting for a
        reply; the engine counts as stopped."""
        self.status = STOPPED
        self._stopped.set()
        routes, self._routes = self._routes, {}
        for request_id, sink in routes.values():
            _deliver(sink, RequestOutput(request_id, "", [], [], None, RequestStatus.FINISHED_ERROR, 0, 0, reason))
        calls, self._calls = self._calls, {}
        for future in calls.values():
            _settle(future, error=UnavailableError(reason))


def _settle(future: concurrent.futures.Future, value: object = None, error: BaseException | None = None) -> None:
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except concurrent.futures.InvalidStateError:  # the caller gave up waiting (cancelled)
        pass


def _deliver(sink: Sink, output: RequestOutput) -> None:
    try:
        sink(output)
    except Exception:  # a sink belongs to one client; its fault must not stop the others' outputs
        log.exception("output sink of %s failed", output.request_id)
