"""`python -m server` / `mamba-extend-server`: start the engine process (it loads the model and warms up), load
the tokenizer and bank, then serve (with --api-server-count N, in N HTTP processes: server.api_servers).

The engine process is launched before this process imports the HTTP side and the runtime (torch among them), so
that the two processes' imports run at the same time; until then only the light configuration module is
imported."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

from .config import ConfigError, parse_args
from .engine_launch import LOG_FORMAT, launch


def main(argv: list[str] | None = None) -> None:
    """Exits with status 2 and the fault's message (no traceback) when the start fails."""
    try:
        config, log_level = parse_args(argv)
    except ConfigError as bad:
        _exit_with(bad)
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    launched = launch(config, log_level)
    try:
        from runtime.errors import RuntimeErrorBase
        from scale_bank import BankError

        from . import api_servers
        from .app import build_app
        from .components import load_components
        from .engine_client import EngineStartError
        from .engine_pool import connect
        from .gc_heap import freeze_startup_heap
        from .http_server import build_server
    except BaseException:
        for process, _ in launched:
            process.kill()
        raise
    try:
        engine = connect([(process, connections[0]) for process, connections in launched])
        try:
            components = load_components(config.model, engine.model)
        except BaseException:
            engine.stop()
            raise
    except (ConfigError, RuntimeErrorBase, BankError, EngineStartError) as bad:
        _exit_with(bad)
    server = build_server(build_app(config, components, engine), config.http, log_level)
    freeze_startup_heap()
    if config.api_server_count == 1:
        server.run()
        return
    sock = server.config.bind_socket()  # one listening socket, which every HTTP process accepts on
    others = api_servers.spawn(config, log_level, launched, sock)
    server.run(sockets=[sock])
    api_servers.join(others)


def _exit_with(bad: Exception) -> NoReturn:
    print(f"mamba-extend-server: error: {bad}", file=sys.stderr)
    raise SystemExit(2) from None


if __name__ == "__main__":
    main()
