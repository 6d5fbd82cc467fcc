"""`python -m server` / `mamba-extend-server`: start the engine process (it loads the model and warms up), load
the tokenizer and bank, then serve."""

from __future__ import annotations

import logging
import sys

from runtime.errors import RuntimeErrorBase
from scale_bank import BankError

from .app import build_app
from .components import load_components
from .config import ConfigError, parse_args
from .engine_client import EngineClient, EngineStartError
from .engine_process import LOG_FORMAT
from .http_server import build_server


def main(argv: list[str] | None = None) -> None:
    """Exits with status 2 and the fault's message (no traceback) when the start fails."""
    try:
        config, log_level = parse_args(argv)
        logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
        engine = EngineClient.start(config, log_level)
        try:
            components = load_components(config.model, engine.model)
        except BaseException:
            engine.stop()
            raise
    except (ConfigError, RuntimeErrorBase, BankError, EngineStartError) as bad:
        print(f"mamba-extend-server: error: {bad}", file=sys.stderr)
        raise SystemExit(2) from None
    build_server(build_app(config, components, engine), config.http, log_level).run()


if __name__ == "__main__":
    main()
