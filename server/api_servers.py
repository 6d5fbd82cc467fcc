"""More HTTP processes (`--api-server-count N`, as vLLM's): HTTP, JSON and server-sent events for many streams at
once take more than one core's interpreter, so N processes serve one listening socket, each with its own
connection to every engine (server.engine_launch) and its own copy of the tokenizer and bank.

The first HTTP process (`python -m server`'s own) binds the socket, launches the engines and these processes,
and owns the shutdown: on SIGTERM or SIGINT it closes the engines' admission, lets the running requests finish
and stops the engines (server.shutdown), whatever process their clients reached. The others ignore the signals
(a terminal's Ctrl-C reaches every process of the group) and exit once their engines have stopped, after the last
answers have gone out; if one dies, the engines abort its requests and serve on.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from .config import ServerConfig
from .engine_launch import NAMED_PROCESS_LOG_FORMAT

log = logging.getLogger(__name__)
JOIN_SECONDS = 15  # after the engines stopped, how long the first process waits for the others to exit


def spawn(config: ServerConfig, log_level: str, launched: list[tuple[BaseProcess, list[Connection]]],
          sock: socket.socket) -> list[BaseProcess]:
    """Starts HTTP processes 1 … N-1 on `sock`, process k with every engine's k-th connection."""
    context = multiprocessing.get_context("spawn")
    processes: list[BaseProcess] = []
    for k in range(1, config.api_server_count):
        connections = [ends[k] for _, ends in launched]
        process = context.Process(target=_serve, args=(config, log_level, connections, sock), name=f"mamba-api-{k}")
        process.start()
        for connection in connections:
            connection.close()  # the process holds its ends
        processes.append(process)
        log.info("HTTP process %d started (pid %s)", k, process.pid)
    return processes


def join(processes: list[BaseProcess]) -> None:
    """After the engines stopped: waits for the other HTTP processes to send their last answers and exit."""
    for process in processes:
        process.join(JOIN_SECONDS)
        if process.is_alive():
            log.warning("HTTP process %s did not exit within %d s: killed", process.name, JOIN_SECONDS)
            process.kill()
            process.join()


def _serve(config: ServerConfig, log_level: str, connections: list[Connection], sock: socket.socket) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format=NAMED_PROCESS_LOG_FORMAT)
    from .app import build_app  # in this process only: the launcher imports nothing heavy
    from .components import load_components
    from .engine_pool import connect
    from .gc_heap import freeze_startup_heap
    from .http_server import build_server

    engine = connect([(None, connection) for connection in connections])
    components = load_components(config.model, engine.model)
    server = build_server(build_app(config, components, engine), config.http, log_level, follower=True)
    freeze_startup_heap()
    server.run(sockets=[sock])
