"""Starting the engine processes without importing what they run: `launch` spawns them (spawned: CUDA cannot be
forked; one per --data-parallel-size rank) with a target whose module imports nothing heavy, so that the HTTP
process can import its own modules (torch among them) while the engine processes import, load the model and warm
up. `server.engine_pool.connect` then waits for them."""

from __future__ import annotations

import multiprocessing
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from .config import ServerConfig, engine_ranks

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# an engine's lines name its process (with --data-parallel-size, the engine they come from), as do the lines of
# the HTTP processes after the first (--api-server-count)
NAMED_PROCESS_LOG_FORMAT = "%(asctime)s %(levelname)s [%(processName)s] %(name)s: %(message)s"


def launch(config: ServerConfig, log_level: str) -> list[tuple[BaseProcess, list[Connection]]]:
    """Each engine's started process and the HTTP side's ends of its connections, one for each HTTP process
    (--api-server-count; the first HTTP process's first), in rank order."""
    context = multiprocessing.get_context("spawn")
    launched: list[tuple[BaseProcess, list[Connection]]] = []
    for rank, rank_config in enumerate(engine_ranks(config)):
        pipes = [context.Pipe() for _ in range(config.api_server_count)]
        name = "mamba-engine" if config.data_parallel_size == 1 else f"mamba-engine-{rank}"
        process = context.Process(target=_run, args=(rank_config, log_level, [theirs for _, theirs in pipes]),
                                  name=name)
        process.start()
        for _, theirs in pipes:
            theirs.close()  # the process holds its ends: ours read EOF when it exits
        launched.append((process, [ours for ours, _ in pipes]))
    return launched


def _run(config: ServerConfig, log_level: str, connections: list[Connection]) -> None:
    from .engine_process import run  # in the engine process only

    run(config, log_level, connections)
