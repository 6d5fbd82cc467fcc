"""`python -m server` / `mamba-extend-server`: load the model, tokenizer and bank once, then serve."""

from __future__ import annotations

import dataclasses
import logging
import sys

import torch

from runtime.errors import RuntimeErrorBase
from scale_bank import BankError

from .app import build_app
from .components import load_components
from .config import ConfigError, parse_args
from .http_server import build_server


def main(argv: list[str] | None = None) -> None:
    """Exits with status 2 and the fault's message (no traceback) when the start fails."""
    try:
        config, log_level = parse_args(argv)
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # The model runs on the engine thread. Once the main thread has run a multi-threaded OpenMP region
        # (loading does), libgomp keeps that team and the engine thread's own team runs far slower on a small
        # CPU (bench/RESULTS.md). So the main thread stays single-threaded and the engine thread takes the
        # machine's threads.
        threads = config.engine.threads or torch.get_num_threads()
        config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, threads=threads))
        torch.set_num_threads(1)
        components = load_components(config.model)
    except (ConfigError, RuntimeErrorBase, BankError) as bad:
        print(f"mamba-extend-server: error: {bad}", file=sys.stderr)
        raise SystemExit(2) from None
    build_server(build_app(config, components), config.http, log_level).run()


if __name__ == "__main__":
    main()
