"""Helpers of the server tests: the test bank, a live server (uvicorn on loopback in a thread, its engine in a
process of its own), a free port, health, waiting."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch

from runtime import ScaleMethod, ScaleSet, load_model
from scale_bank import Bank, BankEntry, model_info
from server.app import build_app
from server.components import load_components
from server.config import DEFAULT_MODEL_DIR, parse_args
from server.engine_pool import start_engines
from server.http_server import build_server

TRAINING_LENGTH = 64  # recorded in the test bank: auto requests up to 64 tokens use no scales
# bucket → (method, granularity, scale per layer): "128" is far from 1 so its text differs from identity's
BUCKETS = {"128": ("delta", "layer", 6.0), "256": ("delta", "per-channel", 0.3), "512": ("decimate", "none", None)}
SERVER_FLAGS = ["--max-batch-size", "4", "--prefill-chunk", "16", "--max-context", "4096", "--heartbeat", "0.05",
                "--served-model-name", "tiny", "--prefill-padding", "on"]  # padded rows as a GPU server runs them


def make_bank(path: Path, model_dir: Path, quantize: str | None = None) -> Bank:
    loaded = load_model(model_dir, quantize=quantize)
    config = loaded.config
    bank = Bank.create(path, {**model_info(config, loaded.fingerprint, loaded.quantization),
                              "training_context_length": TRAINING_LENGTH})
    for bucket, (method, granularity, value) in BUCKETS.items():
        if granularity == "per-channel":
            granularity = "channel" if config.arch == "mamba1" else "head"
        scales = None
        if value is not None:
            shape = () if granularity == "layer" else (config.scale_channels,)
            g = torch.Generator().manual_seed(len(bucket))
            scales = ScaleSet(ScaleMethod(method), tuple(value * (0.8 + 0.4 * torch.rand(shape, generator=g))
                                                         for _ in range(config.n_layer)))
        params = {"layer": 1, "l_base": 64} if method == "decimate" else {}
        bank.add_entry(BankEntry(bucket, int(bucket), method, granularity, "0.1.0-test", params=params), scales)
    return bank


class LiveServer:
    """The app of `python -m server <argv>` served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, argv: list[str]):
        config, _ = parse_args(argv)
        self.config = config
        engine = start_engines(config, "warning")
        self.components = load_components(config.model, engine.model)
        self.app = build_app(config, self.components, engine)
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        scheme = "http" if config.http.ssl_certfile is None else "https"
        self.url = f"{scheme}://127.0.0.1:{self._socket.getsockname()[1]}"
        self._server = build_server(self.app, config.http, "warning")
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    @property
    def engine(self):
        return self.app.state.engine

    @contextlib.contextmanager
    def loop_held(self) -> Iterator[None]:
        """The server's event loop held (running a call that waits for the block to end): the engine thread goes
        on stepping, and its outputs wait in their mailboxes until the loop runs again."""
        entered, release = threading.Event(), threading.Event()

        def hold() -> None:
            entered.set()
            release.wait()

        self._server.servers[0].get_loop().call_soon_threadsafe(hold)
        assert entered.wait(timeout=20), "the event loop did not run the hold"
        try:
            yield
        finally:
            release.set()

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            assert time.monotonic() < deadline and self._thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=20)
        self._socket.close()

    def wait_idle(self, timeout: float = 20) -> None:
        """Until the engine has nothing queued or running (earlier tests' aborted requests included)."""
        deadline = time.monotonic() + timeout
        engines = getattr(self.engine, "engines", [self.engine])  # a data-parallel pool's, or the one
        while any(e.busy or e.free_slots != e.config.slots for e in engines):
            assert time.monotonic() < deadline, "the engine did not become idle"
            time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def healthy(url: str) -> bool:
    """The server at `url` answers /health with 200 (False while it starts, or when it refuses)."""
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def wait_for(condition, timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@contextlib.contextmanager
def embedded_with_template(directory: Path, template: str) -> Iterator[LiveServer]:
    """The embedded model (whose byte-level vocabulary spells any text) served as "embedded" with the chat
    `template` (written into `directory`): the base model has no template of its own."""
    (directory / "template.jinja").write_text(template)
    with LiveServer(["--model", str(DEFAULT_MODEL_DIR), "--served-model-name", "embedded", "--chat-template",
                     str(directory / "template.jinja")]) as live:
        yield live
