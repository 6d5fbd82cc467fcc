"""`python -m server` as a subprocess on a free loopback port, for the HTTP benchmarks (http_ttft,
http_throughput): the model flags they share, a random model of a published shape, starting the server."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from server.config import DEFAULT_MODEL_DIR

from .random_model import SHAPE_NAMES, save_random_model

REPO = Path(__file__).resolve().parents[1]


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and device flags, and the server's own flags after `--`."""
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: the embedded model)")
    parser.add_argument("--shape", choices=SHAPE_NAMES,
                        help="instead of --model: a random model of this shape")
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("server_args", nargs="*", help="more flags for the server, after --")


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """What each request of a throughput bench is: a fixed prompt (`workload_prompt`) and exactly --max-tokens
    generated tokens, with these sampling fields."""
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens each request generates")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)


def workload_prompt(tokens: int) -> list[int]:
    """The throughput benches' prompt: `tokens` token ids, varied, within any vocabulary of 1,010 or more."""
    return [(7 * i) % 1000 + 10 for i in range(tokens)]


def serve_shape(args: argparse.Namespace, directory: Path) -> None:
    """With --shape, saves a random model of that shape (bench.random_model) with the embedded model's
    tokenizer in `directory` and serves it (args.model)."""
    if args.shape:
        args.model = save_random_model(args.shape, directory, DEFAULT_MODEL_DIR / "tokenizer.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen[bytes]:
    """The server of `args` (add_server_arguments) on `port`, once /health answers."""
    command = [sys.executable, "-m", "server", "--port", str(port), "--device", args.device, *args.server_args]
    for flag, value in (("--model", args.model), ("--tokenizer", args.tokenizer), ("--dtype", args.dtype)):
        if value is not None:
            command += [flag, str(value)]
    server = subprocess.Popen(command, cwd=REPO)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not come up in 300 s")


def cpu_seconds(pid: int) -> float | None:
    """User and system CPU seconds a process has used so far (Linux's /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)
