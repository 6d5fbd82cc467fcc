"""Starting the engine process without importing what it runs: `launch` spawns it (spawned: CUDA cannot be
forked) with a target whose module imports nothing heavy, so that the HTTP process can import its own modules
(torch among them) while the engine process imports, loads the model and warms up. `EngineClient.wait` then
waits for it."""

from __future__ import annotations

import multiprocessing
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from .config import ServerConfig

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def launch(config: ServerConfig, log_level: str) -> tuple[BaseProcess, Connection]:
    """The started engine process and this side's end of its connection."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_run, args=(config, log_level, theirs), name="mamba-engine")
    process.start()
    theirs.close()  # the process holds its end: ours reads EOF when it exits
    return process, ours


def _run(config: ServerConfig, log_level: str, connection: Connection) -> None:
    from .engine_process import run  # in the engine process only

    run(config, log_level, connection)
