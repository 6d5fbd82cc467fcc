"""The engine process: loads the model, runs the engine (server.engine) on it, and serves the HTTP processes, each
over a connection of its own (the messages of server.engine_protocol; one HTTP process unless --api-server-count).

The engine runs in a process of its own so that it does not share an interpreter lock with the HTTP side (the
event loop: HTTP, JSON, server-sent events): the engine thread never waits for the loop between the model's
operations, and the loop falls behind the engine, and coalesces its streams, rather than slowing it down.

Threads: the main thread receives the HTTP processes' messages and acts on them; the engine thread runs the
steps; each connection's outbox thread sends what the engine hands over for that HTTP process's requests and the
replies, all that was put while it sent the previous message in the next one (one message per engine step while
the HTTP side keeps up).

The process ignores SIGINT and SIGTERM (a terminal's Ctrl-C, or a supervisor, may signal every process of the
server): the first HTTP process owns the shutdown and ends this one with Stop; when it is gone (its connection
closes), the engine stops and the process exits. When another HTTP process is gone, its requests are aborted.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import replace
from functools import partial
from multiprocessing.connection import Connection, wait

import torch

from runtime.errors import RuntimeErrorBase
from scale_bank import BankError

from .components import Components, load_components, load_served_model, model_info
from .config import ConfigError, ServerConfig
from .detokenizer import OutputText
from .engine import Engine
from .engine_launch import NAMED_PROCESS_LOG_FORMAT
from .engine_protocol import (Abort, Close, EngineRequest, HandOver, HttpMessage, Query, Ready, Reply, StartFailed,
                              Stop, Stopped, Submit)
from .errors import ServerError
from .gc_heap import freeze_startup_heap
from .metrics import Metrics
from .request import Request, RequestOutput

log = logging.getLogger(__name__)
GONE = "the server's HTTP process exited"  # what the requests held are told when it goes without a Stop


def run(config: ServerConfig, log_level: str, connections: list[Connection]) -> None:
    """The engine process (multiprocessing's spawn runs it): Ready on each HTTP process's connection, or
    StartFailed with the fault's message."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format=NAMED_PROCESS_LOG_FORMAT)
    try:
        host = EngineHost.load(config)
    except (ConfigError, RuntimeErrorBase, BankError) as bad:
        for connection in connections:
            connection.send(StartFailed(str(bad)))
        return
    host.serve(connections)


RequestKey = tuple[int, int]  # (the HTTP process's connection index, its key for the request)


class EngineHost:
    """The engine with what it needs in this process: the components its requests are made with (the tokenizer of
    their detokenisers), its metrics, and its unfinished requests by HTTP process and key (for Abort)."""

    def __init__(self, engine: Engine, components: Components, metrics: Metrics) -> None:
        self.engine = engine
        self.components = components
        self.metrics = metrics
        self.requests: dict[RequestKey, Request] = {}
        self.draining = False  # a graceful shutdown has begun (Close)

    @classmethod
    def load(cls, config: ServerConfig) -> EngineHost:
        """Loads the model and its tokenizer and bank, and starts the engine warmed up."""
        # Once a thread has run a multi-threaded OpenMP region (loading does), libgomp keeps that team, and another
        # thread's own team then runs far slower on a small CPU (bench/RESULTS.md). So this thread stays
        # single-threaded and the engine thread takes the machine's threads.
        threads = config.engine.threads or torch.get_num_threads()
        torch.set_num_threads(1)
        loaded = load_served_model(config.model)  # refuses a device this machine lacks
        device = torch.device(config.model.device)
        if device.type == "cuda" and device.index is not None:  # Triton launches and graphs capture on it; a bare
            torch.cuda.set_device(device)                        # "cuda" is the current device already
        components = load_components(config.model, model_info(loaded))
        metrics = Metrics(device, config.http.served_model_name)
        engine = Engine(loaded.model, components.tokenizer, replace(config.engine, threads=threads), metrics,
                        components.extensions)
        engine.warm_up()
        freeze_startup_heap()
        engine.start()
        return cls(engine, components, metrics)

    def serve(self, connections: list[Connection]) -> None:
        """Acts on the HTTP processes' messages until the first one's Stop, or until its connection closes."""
        outboxes = [Outbox(connection, self.engine) for connection in connections]

        def send_outputs() -> None:
            for outbox in outboxes:
                outbox.send_outputs()
                if self.draining:  # every HTTP process follows the engine's status after each step, so that the
                    outbox.send_status()  # first one's shutdown sees whether any process's request runs on

        self.engine.handed_over = send_outputs
        started = Ready(self.components.model, self.engine.config, self.engine.status())
        for connection, outbox in zip(connections, outboxes):
            connection.send(started)
            outbox.start()
        open_ = dict(enumerate(connections))  # by index: 0 is the first HTTP process's
        while True:
            for readable in wait(list(open_.values())):
                index = next(i for i, connection in open_.items() if connection is readable)
                try:
                    message: HttpMessage = open_[index].recv()
                except (EOFError, OSError):  # that HTTP process is gone
                    if index == 0:
                        self.engine.stop(GONE)
                        return
                    del open_[index]
                    self._abort_all_of(index)
                    continue
                if isinstance(message, Stop):
                    self.engine.stop(message.reason)
                    for outbox in outboxes:
                        outbox.finish()
                    return
                self._act(index, message, outboxes)

    def _abort_all_of(self, index: int) -> None:
        log.info("HTTP process %d closed its connection: its requests are aborted", index)
        self.engine.abort(*[request for (owner, _), request in list(self.requests.items()) if owner == index])

    def _act(self, index: int, message: HttpMessage, outboxes: list[Outbox]) -> None:
        outbox = outboxes[index]
        if isinstance(message, Submit):
            requests = [self._request(spec, index, outbox) for spec in message.requests]
            try:
                self.engine.submit(*requests)
                outbox.reply(Reply(message.call))
            except ServerError as refused:
                for spec in message.requests:
                    for member in spec.group:
                        self.requests.pop((index, member.key), None)
                outbox.reply(Reply(message.call, error=refused))
        elif isinstance(message, Abort):
            self.engine.abort(*[r for key in message.keys if (r := self.requests.get((index, key))) is not None])
        elif isinstance(message, Close):
            self.engine.close()
            self.draining = True
            outbox.reply(Reply(message.call))
            for other in outboxes:  # every HTTP process's /health then says the server is shutting down
                if other is not outbox:
                    other.send_status()
        elif isinstance(message, Query):
            value = self.metrics.exposition() if message.name == "metrics" else list(self.engine.step_log)
            outbox.reply(Reply(message.call, value))

    def _request(self, spec: EngineRequest, index: int, outbox: Outbox) -> Request:
        """The engine's request of `spec` (with its forks) from HTTP process `index`, whose outputs go to its
        outbox."""
        params, components = spec.params, self.components
        request = Request(spec.request_id, spec.prompt_ids, params, spec.bucket,
                          OutputText(components.tokenizer, params.stop, params.min_tokens, params.include_stop_str,
                                     params.skip_special_tokens),
                          partial(self._hand_over, outbox, (index, spec.key)), spec.timeout, spec.decimates,
                          arrival_time=spec.arrival_time)
        request.forks = [self._request(fork, index, outbox) for fork in spec.forks]
        self.requests[(index, spec.key)] = request
        return request

    def _hand_over(self, outbox: Outbox, key: RequestKey, output: RequestOutput) -> None:
        """A request's sink (on the engine thread)."""
        if output.finished:
            self.requests.pop(key, None)
        outbox.output(key[1], output)


class Outbox:
    """What goes to the HTTP side, sent by a thread of its own: the outputs of each engine step together (and
    those of several steps while it sends one hand-over), with the replies put meanwhile and the engine's status
    read after them."""

    def __init__(self, connection: Connection, engine: Engine) -> None:
        self._connection = connection
        self._engine = engine
        self._cond = threading.Condition()
        self._outputs: list[tuple[int, RequestOutput]] = []
        self._replies: list[Reply] = []
        self._status_due = False  # a hand-over of the engine's status alone is to go
        self._finishing = False
        self._thread = threading.Thread(target=self._send, name="engine-outbox", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def output(self, key: int, output: RequestOutput) -> None:
        """Gathers a step's output; `send_outputs` sends them once the step has handed over all of its own: one
        wake-up of the sending thread a step, not one per output, each of which contends for the engine thread's
        interpreter lock."""
        with self._cond:
            self._outputs.append((key, output))

    def send_outputs(self) -> None:
        with self._cond:
            if self._outputs:
                self._cond.notify()

    def send_status(self) -> None:
        with self._cond:
            self._status_due = True
            self._cond.notify()

    def reply(self, reply: Reply) -> None:
        with self._cond:
            self._replies.append(reply)
            self._cond.notify()

    def finish(self) -> None:
        """Sends what is left, then Stopped; returns once it is sent (the engine has stopped: nothing more comes)."""
        with self._cond:
            self._finishing = True
            self._cond.notify()
        self._thread.join()

    def _send(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._outputs or self._replies or self._status_due or self._finishing):
                        self._cond.wait()
                    outputs, self._outputs = self._outputs, []
                    replies, self._replies = self._replies, []
                    status_due, self._status_due = self._status_due, False
                    finishing = self._finishing
                if outputs or replies or status_due:
                    self._connection.send(HandOver(outputs, replies, self._engine.status()))
                if finishing:
                    self._connection.send(Stopped())
                    return
        except OSError:  # the HTTP process is gone; the main thread sees the connection close and acts on it
            log.info("an HTTP process closed its connection")
