"""Several engines behind one HTTP side (vLLM's data parallelism, `--data-parallel-size N`): each engine process
holds the whole model on a device of its own (server.config.engine_ranks). A client request, with its n samples
(which share one prefill), goes to the engine with the fewest unfinished requests; `/metrics` merges the
engines' series, each labelled with its engine's rank.

A Mamba sequence's whole context is one fixed-size state, so a request never needs another engine's memory: the
engines share nothing but the HTTP side, and N devices serve N times the streams of one.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from .config import ServerConfig
from .engine import StepRecord
from .engine_client import EngineClient, Sink
from .engine_launch import launch
from .engine_protocol import EngineRequest
from .errors import QueueFullError, UnavailableError
from .prefix_affinity import PrefixAffinity

ENGINE_LABEL = "engine"  # vLLM's label for a data-parallel engine's series


class EnginePool:
    """Engine clients that serve as one (the interface of EngineClient): a request goes to one engine; the pool
    is alive while all of its engines are (a dead engine's requests end with an error, the others go on serving,
    and /health says 503 so that the server gets restarted)."""

    def __init__(self, engines: list[EngineClient]) -> None:
        self.engines = engines
        self.model = engines[0].model
        self.config = min((engine.config for engine in engines), key=lambda config: config.slots)  # n fits any
        # with prefix caching, where each prompt's prefixes were sent (a prefix's states are in that engine only)
        self.affinity = PrefixAffinity(self.config.chunk) if self.config.prefix_rows else None

    @property
    def alive(self) -> bool:
        return all(engine.alive for engine in self.engines)

    @property
    def accepting(self) -> bool:
        return all(engine.accepting for engine in self.engines)

    @property
    def busy(self) -> bool:
        return any(engine.busy for engine in self.engines)

    async def submit(self, requests: list[EngineRequest], sinks: dict[str, Sink]) -> None:
        """Queues `requests` in the engine with the fewest unfinished requests (the next least loaded when its
        queue is full), or with prefix caching in the engine that ran the longest prefix of the first prompt while
        it has fewer than a batch of requests more than the least loaded. Raises the last engine's ServerError
        when none takes them."""
        candidates = sorted((engine for engine in self.engines if engine.alive), key=lambda engine: engine.unfinished)
        if not candidates:
            raise UnavailableError("the engine is not running")
        hashes: list[int] = []
        if self.affinity is not None:
            held, hashes = self.affinity.engine(requests[0].bucket, requests[0].prompt_ids)
            holder = None if held is None else self.engines[held]
            if holder in candidates and holder.unfinished < candidates[0].unfinished + holder.config.slots:
                candidates = [holder, *(engine for engine in candidates if engine is not holder)]
        for engine in candidates:
            try:
                await engine.submit(requests, sinks)
            except QueueFullError:
                if engine is candidates[-1]:
                    raise
                continue
            if self.affinity is not None:
                self.affinity.ran(hashes, self.engines.index(engine))
            return

    def abort(self, *requests: EngineRequest) -> None:
        for engine in self.engines:  # keys are unique in the pool: each engine cancels only its own
            engine.abort(*requests)

    async def metrics(self) -> bytes:
        """The engines' Prometheus expositions as one, every series labelled with its engine's rank."""
        return merged_exposition(await asyncio.gather(*(engine.metrics() for engine in self.engines)))

    @property
    def step_log(self) -> list[StepRecord]:
        """Every engine's last steps, engine by engine."""
        return [record for engine in self.engines for record in engine.step_log]

    async def close(self) -> None:
        await asyncio.gather(*(engine.close() for engine in self.engines))

    def stop(self, reason: str | None = None) -> None:
        for engine in self.engines:
            engine.stop(reason)


Engines = EngineClient | EnginePool


def start_engines(config: ServerConfig, log_level: str) -> Engines:
    """Starts the engine processes and waits until each has loaded the model and warmed up."""
    return connect([(process, connections[0]) for process, connections in launch(config, log_level)])


def connect(launched: list[tuple[BaseProcess | None, Connection]]) -> Engines:
    """The client of the launched engine processes (server.engine_launch) once every one is ready, over one
    connection each: the process where this HTTP process launched it, None where another did (its client then
    leaves the engine when it stops, server.api_servers). Raises EngineStartError with the first fault's message,
    the other engines stopped, when one cannot start."""
    if len(launched) == 1:
        return EngineClient.wait(*launched[0])
    keys = itertools.count()  # one numbering for every engine's requests: an abort names one request
    engines: list[EngineClient] = []
    try:
        for process, connection in launched:
            engines.append(EngineClient.wait(process, connection, keys))
    except BaseException:
        for engine in engines:
            engine.stop()
        for process, _ in launched[len(engines):]:
            if process is not None:
                process.kill()
        raise
    return EnginePool(engines)


def merged_exposition(expositions: list[bytes]) -> bytes:
    """One Prometheus exposition of several engines' (each engine's text parsed by prometheus_client and written
    again): a family's series of every engine together under one HELP and TYPE, each with its engine's rank."""
    families: dict[str, Metric] = {}
    for rank, exposition in enumerate(expositions):
        for family in text_string_to_metric_families(exposition.decode()):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
            merged.samples += [sample._replace(labels={**sample.labels, ENGINE_LABEL: str(rank)})
                               for sample in family.samples]
    registry = CollectorRegistry()
    registry.register(_Families(families.values()))
    return generate_latest(registry)


class _Families:
    """A collector of families already made."""

    def __init__(self, families) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)
