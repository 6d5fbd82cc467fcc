"""Soak: `--clients` concurrent clients send mixed requests to a `python -m server` for `--minutes`, and the run
is judged as issue 25's "Done when" asks: no errors, the p99 latency of the last window within 1.5x the first's,
and the server's resident memory growing by under 10% from the end of the first window to the end.

Each client loops over a fixed mix (seeded): short and long prompts, streamed (with usage) or not, stop strings,
echo with logprobs. An error is any answer that is not 200, or a stream that does not end with [DONE] after a
finish reason. Not run in CI (ten minutes by default):

    python -m bench.soak                           # the embedded model on CPU, 4 clients, 10 minutes
    python -m bench.soak --minutes 0.5 --json soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .server_process import free_port, start_server
from .report import print_row, save_json

WORDS = ("the river ran past the old mill and the pass key is 48213 remember it what is the pass key "
         "once upon a time there was a long road").split()
P99_RATIO = 1.5  # the last window's p99 latency may be at most this times the first's
RSS_GROWTH = 0.10  # resident memory may grow by less than this fraction
RSS_PERIOD = 1.0  # seconds between two readings of the server's resident memory


def mixed_request(rng: random.Random) -> dict:
    """One request of the mix: prompt length, streaming, stop strings and echo drawn from `rng`."""
    words = rng.choice((8, 8, 64, 512, 2048))
    body: dict[str, Any] = {
        "prompt": " ".join(rng.choice(WORDS) for _ in range(words)), "max_tokens": rng.choice((1, 16, 64)),
        "temperature": rng.choice((0, 0.8)), "seed": rng.randrange(1000), "stream": rng.random() < 0.5}
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.3:
        body["stop"] = rng.sample(WORDS, 3)
    if rng.random() < 0.15:
        body.update(echo=True, logprobs=2, max_tokens=0)
    return body


def send(client: httpx.Client, body: dict) -> str | None:
    """Sends `body`; returns None when it was answered completely, else what went wrong."""
    if not body["stream"]:
        response = client.post("/v1/completions", json=body)
        return None if response.status_code == 200 else f"{response.status_code}: {response.text[:200]}"
    with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return f"{response.status_code}: {response.read()[:200]!r}"
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    if events[-1:] != ["[DONE]"]:
        return f"stream without [DONE]: {events[-1:]}"
    chunks = [json.loads(e) for e in events[:-1]]
    if any("error" in c for c in chunks) or not any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks):
        return f"stream with an error or no finish reason: {events[-2][:200]}"
    return None


@dataclass
class Record:
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, latency)
    errors: list[str] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)
    lock: threading.Lock = field(default_factory=threading.Lock)


def run_client(url: str, seed: int, start: float, end: float, record: Record) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=600) as client:
        while time.monotonic() < end:
            sent = time.monotonic()
            try:
                error = send(client, mixed_request(rng))
            except httpx.HTTPError as bad:
                error = f"{type(bad).__name__}: {bad}"
            with record.lock:
                record.latencies.append((sent - start, time.monotonic() - sent))
                if error is not None:
                    record.errors.append(error)


def watch_memory(pid: int, start: float, end: float, record: Record) -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    while time.monotonic() < end:
        with open(f"/proc/{pid}/statm") as statm:
            record.rss.append((time.monotonic() - start, int(statm.read().split()[1]) * page))
        time.sleep(RSS_PERIOD)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan")


def judge(record: Record, seconds: float) -> dict:
    """The run's figures and whether each criterion holds. The windows are the first and last minute, or the
    first and last third of a run shorter than three minutes."""
    window = min(60.0, seconds / 3)
    first = [lat for t, lat in record.latencies if t < window]
    last = [lat for t, lat in record.latencies if t >= seconds - window]
    rss_start = next((b for t, b in record.rss if t >= window), record.rss[-1][1])
    rss_end = record.rss[-1][1]
    row = {"requests": len(record.latencies), "errors": len(record.errors), "window_s": window,
           "p99_first_s": p99(first), "p99_last_s": p99(last), "rss_start_mb": rss_start / 2**20,
           "rss_end_mb": rss_end / 2**20, "rss_growth": rss_end / rss_start - 1}
    row["pass_errors"] = row["errors"] == 0
    row["pass_p99"] = row["p99_last_s"] <= P99_RATIO * row["p99_first_s"]
    row["pass_rss"] = row["rss_growth"] < RSS_GROWTH
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: the embedded model)")
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("server_args", nargs="*", help="more flags for the server, after --")
    args = parser.parse_args(argv)
    args.server_args = ["--log-level", "warning", *args.server_args]  # no access log line per request
    port = free_port()
    server = start_server(args, port)
    try:
        seconds = args.minutes * 60
        start = time.monotonic()
        end = start + seconds
        record = Record()
        threads = [threading.Thread(target=run_client, args=(f"http://127.0.0.1:{port}", seed, start, end, record))
                   for seed in range(args.clients)]
        threads.append(threading.Thread(target=watch_memory, args=(server.pid, start, end, record)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        server.terminate()
        server.wait(timeout=120)
    row = {**judge(record, seconds), "server_exit": server.returncode}
    print_row(row)
    for error in record.errors[:10]:
        print("error:", error)
    save_json({**row, "first_errors": record.errors[:10]}, args.json)
    if not (row["pass_errors"] and row["pass_p99"] and row["pass_rss"] and server.returncode == 0):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
