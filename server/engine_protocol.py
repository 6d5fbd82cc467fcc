"""The messages between an HTTP process and the engine process (server.engine_process), pickled over one
multiprocessing connection (one for each HTTP process: --api-server-count).

HTTP side → engine: Submit (answered by a Reply: None, or the ServerError that refused the requests), Abort,
Close and Query (answered by a Reply), Stop (the first HTTP process only: it owns the shutdown).
Engine → HTTP side: Ready (or StartFailed) once; then hand-overs, each with the outputs made and the replies
written since the previous one (one engine step's outputs, or several steps' while the connection was busy)
and the engine's status after them; Stopped last.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from runtime import ModelConfig

from .config import EngineConfig
from .errors import ServerError
from .request import RequestOutput, SamplingParams


@dataclass(frozen=True)
class ModelInfo:
    """What the HTTP side knows of the model the engine process loaded: enough to load the bank that matches it
    and to describe it."""

    path: Path
    config: ModelConfig
    fingerprint: str
    quantization: str | None


@dataclass
class EngineRequest:
    """A request as the HTTP side submits it; the engine process makes its `server.request.Request` of it (with
    its own detokeniser and a sink that sends the outputs back; its model runner applies `bucket`'s extension)."""

    request_id: str  # the client's (X-Request-Id), for logs and metrics: two requests may share one
    prompt_ids: list[int]
    params: SamplingParams
    bucket: str  # the scale bucket chosen for it ("none": identity)
    timeout: float | None  # seconds from arrival
    decimates: bool  # the bucket's extension drops prompt positions (a decimation)
    # time.monotonic(): CLOCK_MONOTONIC on Linux, one clock for both processes
    arrival_time: float = field(default_factory=time.monotonic)
    forks: list[EngineRequest] = field(default_factory=list)  # n > 1: the prompt's other samples
    key: int = -1  # its own number while the server runs, set when submitted: outputs and aborts go by it

    @property
    def group(self) -> list[EngineRequest]:
        return [self, *self.forks]


@dataclass(frozen=True)
class EngineStatus:
    """The engine as the last hand-over saw it."""

    alive: bool  # the engine thread runs and takes or finishes requests
    busy: bool  # some request is queued or running
    free_slots: int
    waiting: int  # requests queued for a slot
    accepting: bool = True  # takes new requests (false once a graceful shutdown has begun: Close)


@dataclass
class Submit:
    call: int
    requests: list[EngineRequest]  # all or none are queued, each with its forks


@dataclass
class Abort:
    keys: list[int]


@dataclass
class Close:
    """No more requests: a graceful shutdown has begun. Answered by a Reply, whose hand-over's status is the
    engine's after it (whether any HTTP process's requests still run)."""

    call: int


@dataclass
class Query:
    call: int
    name: str  # "metrics": the Prometheus exposition (bytes); "steps": the engine's step log (StepRecords)


@dataclass
class Stop:
    reason: str | None  # what the requests still held are told


@dataclass
class Reply:
    call: int
    value: object = None
    error: ServerError | None = None  # Submit: why the requests were refused


@dataclass
class HandOver:
    """Everything the engine process sends between its start and its stop."""

    outputs: list[tuple[int, RequestOutput]]  # (request key, what a step added), in the order they were made
    replies: list[Reply]
    status: EngineStatus  # read after the outputs and replies were made


@dataclass
class Ready:
    model: ModelInfo
    engine: EngineConfig  # the engine's own: its slots sized (server.slots) when --max-batch-size was not given
    status: EngineStatus


@dataclass
class StartFailed:
    message: str


@dataclass
class Stopped:
    """The last message: the engine stopped, after handing over the outputs of the requests the stop ended."""


HttpMessage = Submit | Abort | Close | Query | Stop
EngineMessage = Ready | StartFailed | HandOver | Stopped
