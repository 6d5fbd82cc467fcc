"""The engine process: loads the model, runs the engine (server.engine) on it, and serves the HTTP process over
one connection (the messages of server.engine_protocol).

The engine runs in a process of its own so that it does not share an interpreter lock with the HTTP side (the
event loop: HTTP, JSON, server-sent events): the engine thread never waits for the loop between the model's
operations, and the loop falls behind the engine, and coalesces its streams, rather than slowing it down.

Threads: the main thread receives the HTTP side's messages and acts on them; the engine thread runs the steps;
the outbox's thread sends what the engine hands over and the replies, all that was put while it sent the
previous message in the next one (one message per engine step while the HTTP side keeps up).

The process ignores SIGINT and SIGTERM (a terminal's Ctrl-C, or a supervisor, may signal every process of the
server): the HTTP process owns the shutdown and ends this one with Stop; when the HTTP process is gone (the
connection closes), it stops its engine and exits.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import replace
from functools import partial
from multiprocessing.connection import Connection

import torch

from runtime.errors import RuntimeErrorBase
from scale_bank import BankError

from .components import Components, load_components, load_served_model, model_info
from .config import ConfigError, ServerConfig
from .detokenizer import OutputText
from .engine import Engine
from .engine_launch import ENGINE_LOG_FORMAT
from .engine_protocol import (Abort, Close, EngineRequest, HandOver, HttpMessage, Query, Ready, Reply, StartFailed,
                              Stop, Stopped, Submit)
from .errors import ServerError
from .metrics import Metrics
from .request import Request, RequestOutput

log = logging.getLogger(__name__)
GONE = "the server's HTTP process exited"  # what the requests held are told when it goes without a Stop


def run(config: ServerConfig, log_level: str, connection: Connection) -> None:
    """The engine process (multiprocessing's spawn runs it): Ready, or StartFailed with the fault's message."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format=ENGINE_LOG_FORMAT)
    try:
        host = EngineHost.load(config)
    except (ConfigError, RuntimeErrorBase, BankError) as bad:
        connection.send(StartFailed(str(bad)))
        return
    host.serve(connection)


class EngineHost:
    """The engine with what it needs in this process: the components its requests are made with (the tokenizer of
    their detokenisers), its metrics, and its unfinished requests by key (for Abort)."""

    def __init__(self, engine: Engine, components: Components, metrics: Metrics) -> None:
        self.engine = engine
        self.components = components
        self.metrics = metrics
        self.requests: dict[int, Request] = {}

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
        engine.start()
        return cls(engine, components, metrics)

    def serve(self, connection: Connection) -> None:
        """Acts on the HTTP side's messages until Stop, or until the connection closes."""
        outbox = Outbox(connection, self.engine)
        self.engine.handed_over = outbox.send_outputs
        connection.send(Ready(self.components.model, self.engine.config, self.engine.status()))
        outbox.start()
        while True:
            try:
                message: HttpMessage = connection.recv()
            except (EOFError, OSError):  # the HTTP process is gone
                self.engine.stop(GONE)
                return
            if isinstance(message, Stop):
                self.engine.stop(message.reason)
                outbox.finish()
                return
            self._act(message, outbox)

    def _act(self, message: HttpMessage, outbox: Outbox) -> None:
        if isinstance(message, Submit):
            requests = [self._request(spec, outbox) for spec in message.requests]
            try:
                for spec in message.requests:  # compiled here, not on the engine thread, which would stall every
                    if spec.params.guide is not None:  # stream for a large schema's compile
                        self.engine.guides.compiled(spec.params.guide)
                self.engine.submit(*requests)
                outbox.reply(Reply(message.call))
            except ServerError as refused:
                for spec in message.requests:
                    for member in spec.group:
                        self.requests.pop(member.key, None)
                outbox.reply(Reply(message.call, error=refused))
        elif isinstance(message, Abort):
            self.engine.abort(*[r for key in message.keys if (r := self.requests.get(key)) is not None])
        elif isinstance(message, Close):
            self.engine.close()
        elif isinstance(message, Query):
            value = self.metrics.exposition() if message.name == "metrics" else list(self.engine.step_log)
            outbox.reply(Reply(message.call, value))

    def _request(self, spec: EngineRequest, outbox: Outbox) -> Request:
        """The engine's request of `spec` (with its forks), whose outputs go to the outbox."""
        params, components = spec.params, self.components
        request = Request(spec.request_id, spec.prompt_ids, params, spec.bucket,
                          OutputText(components.tokenizer, params.stop, params.min_tokens, params.include_stop_str,
                                     params.skip_special_tokens),
                          partial(self._hand_over, outbox, spec.key), spec.timeout, spec.decimates,
                          arrival_time=spec.arrival_time)
        request.forks = [self._request(fork, outbox) for fork in spec.forks]
        self.requests[spec.key] = request
        return request

    def _hand_over(self, outbox: Outbox, key: int, output: RequestOutput) -> None:
        """A request's sink (on the engine thread)."""
        if output.finished:
            self.requests.pop(key, None)
        outbox.output(key, output)


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
                    while not (self._outputs or self._replies or self._finishing):
                        self._cond.wait()
                    outputs, self._outputs = self._outputs, []
                    replies, self._replies = self._replies, []
                    finishing = self._finishing
                if outputs or replies:
                    self._connection.send(HandOver(outputs, replies, self._engine.status()))
                if finishing:
                    self._connection.send(Stopped())
                    return
        except OSError:  # the HTTP process is gone; the main thread sees the connection close and stops the engine
            log.info("the HTTP process closed the connection")
