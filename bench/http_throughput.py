"""Many concurrent streams through HTTP against the engine's own batched decode, in one run.

Starts `python -m server` (a subprocess on a free loopback port) and, for each N of `--streams`, N concurrent
clients (asyncio + httpx, one connection each) stream a completion of a fixed prompt (`--prompt-tokens` token ids)
of exactly `--max-tokens` tokens (`ignore_eos`). Reported per N: aggregate output tokens/s (all tokens over the wall
time from the first request sent to the last stream's end), time to first token p50/p99/max, the gap between
streamed chunks p50/p99 and the tokens per chunk (the server sends a stream's waiting tokens in one chunk when it
falls behind), the spread of the requests' sends and each stream's own time, p50 and max (the wall is at most their
sum: whether the sends or the slowest stream made it), and the client's CPU time over that wall time (of the busiest
client process, when `--client-processes` share the streams; near 1.0: the client, not the server, is the limit),
and from the server's own histograms over that run (/metrics) each request's mean time to first token from its
arrival (the HTTP side's parsing before it, and the delivery after, are what the client's TTFT adds), wait for a
slot and prefill, and the engine's steps of each kind, how many and their mean time (a decode step's against the
engine's alone below: the host work serving adds to each step). The peer, measured in this process between the HTTP
runs (the server idle): the engine's model runner decoding greedy steps of min(N, --max-batch-size) sequences (the
batch the server runs), with the ratio of the two throughputs; and the engine's round of the same work, its prefill
included: that batch's prompts prefilled in the server's chunks and steps, their first tokens chosen, then the
decode steps of the rest of the completions. A stream's prompt is GPU work that the decode-only figure leaves out (a
batch of 64 1,000-token prompts is one 64k-token prefill), so that round's throughput bounds what HTTP can reach;
the second ratio is HTTP's share of it.

    python -m bench.http_throughput --streams 1,16                       # the embedded model on CPU
    python -m bench.http_throughput --shape 130m --device cuda --prompt-tokens 1000 -- --max-batch-size 256
    python -m bench.http_throughput --shape tiny --streams 1,8,32,64 -- --max-batch-size 64 --threads 1

`--shape` serves a random model of that shape (bench.random_model) with the embedded model's tokenizer; `tiny`
is a CPU proxy of a GPU server (a step of a fraction of a millisecond: the server's host side is the limit).
Flags after `--` go to the server (`--max-batch-size` is read from there too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from runtime import load_model
from scale_bank import NONE
from server.config import DEFAULT_MODEL_DIR, EngineConfig, parse_args
from server.gc_heap import freeze_startup_heap
from server.model_runner import ModelRunner
from server.sampling import greedy
from server.slots import sized, slot_bytes, ssm_state_dtype

from .report import print_row, print_table, save_json
from .server_process import (add_server_arguments, add_workload_arguments, cpu_seconds, free_port, serve_shape,
                             start_server, workload_prompt)

STEPS = 32  # timed engine steps per measurement
WARMUP = 4
CLIENT_LEAD = 0.5  # seconds from handing the streams to the client processes to their first sends


@dataclass
class Stream:
    """One client's timings: when it was sent, and when each chunk with generated text arrived."""

    sent: float
    chunks: list[float] = field(default_factory=list)
    tokens: int = 0  # completion tokens, from the usage chunk
    ended: float = 0.0


async def stream_one(client: httpx.AsyncClient, body: dict) -> Stream:
    record = Stream(time.perf_counter())
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices"):
                record.chunks.append(time.perf_counter())
            elif event.get("usage"):
                record.tokens = event["usage"]["completion_tokens"]
            else:
                raise RuntimeError(f"unexpected event {event}")
    record.ended = time.perf_counter()
    return record


async def run_streams(url: str, n: int, body: dict, start_at: float = 0.0) -> tuple[list[Stream], float, float]:
    """n concurrent streams of `body`, sent from `start_at` (time.perf_counter's clock, which every process on the
    machine shares; by default at once). Returns them, the wall time and the client's CPU seconds."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        await asyncio.sleep(start_at - time.perf_counter())
        cpu, start = time.process_time(), time.perf_counter()
        streams = await asyncio.gather(*(stream_one(client, body) for _ in range(n)))
        return list(streams), time.perf_counter() - start, time.process_time() - cpu


def client_share(url: str, n: int, body: dict, start_at: float) -> tuple[list[Stream], float]:
    """A client process's share of the streams: its streams and its CPU seconds."""
    freeze_startup_heap()  # a full collection of the imports' objects would stall its streams (server.gc_heap)
    streams, _, cpu = asyncio.run(run_streams(url, n, body, start_at))
    return streams, cpu


def run_clients(pool: ProcessPoolExecutor | None, workers: int, url: str, n: int,
                body: dict) -> tuple[list[Stream], float, float]:
    """n concurrent streams of `body`, shared among the pool's `workers` processes (no pool: this process),
    which start together. Returns them, the wall time from the first sent to the last ended, and the CPU seconds
    of the busiest client process."""
    # Every process sends from one moment, after its hand-over and its client's making (an SSL context each),
    # which would otherwise stagger the processes' first sends by up to a few hundred ms
    start_at = time.perf_counter() + CLIENT_LEAD
    if pool is None:
        return asyncio.run(run_streams(url, n, body, start_at))
    shares = [n // workers + (i < n % workers) for i in range(workers)]
    results = [future.result() for future in [pool.submit(client_share, url, s, body, start_at)
                                              for s in shares if s]]
    streams = [s for share, _ in results for s in share]
    wall = max(s.ended for s in streams) - min(s.sent for s in streams)
    return streams, wall, max(cpu for _, cpu in results)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def http_row(streams: list[Stream], wall: float, client_cpu: float) -> dict:
    first = [s.chunks[0] - s.sent for s in streams]
    gaps = [b - a for s in streams for a, b in zip(s.chunks, s.chunks[1:])]
    tokens = sum(s.tokens for s in streams)
    lasted = [s.ended - s.sent for s in streams]
    return {"tokens": tokens, "http_tokens_per_s": tokens / wall,
            "tokens_per_chunk": tokens / sum(len(s.chunks) for s in streams),
            # the wall is the spread of the sends plus the streams' own time: which of them made it
            "send_spread_ms": 1e3 * (max(s.sent for s in streams) - min(s.sent for s in streams)),
            "stream_p50_ms": 1e3 * percentile(lasted, 50), "stream_max_ms": 1e3 * max(lasted),
            "ttft_p50_ms": 1e3 * percentile(first, 50),
            "ttft_p99_ms": 1e3 * percentile(first, 99), "ttft_max_ms": 1e3 * max(first),
            "gap_p50_ms": 1e3 * percentile(gaps, 50) if gaps else 0.0,
            "gap_p99_ms": 1e3 * percentile(gaps, 99) if gaps else 0.0, "client_cpu": client_cpu / wall}


def engine_tokens_per_s(runner: ModelRunner, batch: int) -> float:
    """Greedy decode steps of `batch` sequences through the runner, as the engine runs them (its greedy choice,
    read back)."""
    slots, buckets = list(range(batch)), [NONE] * batch
    tokens = [1] * batch
    for _ in range(WARMUP):
        tokens = greedy(runner.decode(slots, tokens, buckets)).tolist()
    start = time.perf_counter()
    for _ in range(STEPS):
        tokens = greedy(runner.decode(slots, tokens, buckets)).tolist()
    return batch * STEPS / (time.perf_counter() - start)


def prefill_seconds(runner: ModelRunner, batch: int, prompt: list[int], chunk: int, step_tokens: int) -> float:
    """`batch` copies of `prompt` prefilled as the engine's steps do (chunks of up to `chunk` tokens, as many
    prompts a step as `step_tokens` holds), then each one's first token chosen greedily and read back."""
    slots, length = list(range(batch)), min(len(prompt), chunk)
    rows = max(1, step_tokens // length)  # prompts a step
    start = time.perf_counter()
    for begin in range(0, len(prompt), length):
        for first in range(0, batch, rows):
            group = slots[first:first + rows]
            last = runner.prefill(group, [prompt[begin:begin + length]] * len(group), [begin == 0] * len(group),
                                  [NONE] * len(group), whole=False).last  # (g, D)
            if begin + length >= len(prompt):
                greedy(runner.model.logits(last)).tolist()
    return time.perf_counter() - start


def round_tokens_per_s(runner: ModelRunner, batch: int, prompt: list[int], max_tokens: int, chunk: int,
                       step_tokens: int, decode_tokens_per_s: float) -> float:
    """The engine's throughput over a round of `batch` streams: their prefill (timed), then max_tokens - 1 decode
    steps at the decode-only rate."""
    prefill_seconds(runner, batch, prompt, chunk, step_tokens)  # warm: this batch's shapes
    prefill = prefill_seconds(runner, batch, prompt, chunk, step_tokens)
    return batch * max_tokens / (prefill + (max_tokens - 1) * batch / decode_tokens_per_s)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_arguments(parser)
    parser.add_argument("--streams", default="1,8,32,64,128,256", help="the numbers of concurrent streams")
    add_workload_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--client-processes", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                        help="processes the streams are shared among, so that the client is not the limit "
                             "(default: half the cores, at most 8; 1: the streams run in this process)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.streams.split(",")]
    served = parse_args(["--device", args.device, *args.server_args])[0].engine  # the server's engine settings
    body = {"prompt": workload_prompt(args.prompt_tokens), "max_tokens": args.max_tokens,
            "temperature": args.temperature, "top_p": args.top_p, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with tempfile.TemporaryDirectory() as directory:
        serve_shape(args, Path(directory))
        port = free_port()
        server = start_server(args, port)
        try:
            rows = measure(args, served, counts, body, f"http://127.0.0.1:{port}", server.pid)
        finally:
            server.terminate()
            server.wait(timeout=60)
    print_table(["streams", "engine batch", "HTTP tokens/s", "engine decode tokens/s", "ratio",
                 "engine round with prefill tokens/s", "ratio", "TTFT p50 / p99 / max ms", "gap p50 / p99 ms",
                 "tokens/chunk", "sends' spread / stream p50 / max ms", "client CPU", "HTTP process CPU µs a token",
                 "server: TTFT / queue / prefill ms a request",
                 "engine steps: prefill n × ms, decode n × ms"],
                [[str(r["streams"]), str(r["engine_batch"]), f"{r['http_tokens_per_s']:,.0f}",
                  f"{r['engine_tokens_per_s']:,.0f}", f"{r['ratio']:.2f}", f"{r['round_tokens_per_s']:,.0f}",
                  f"{r['round_ratio']:.2f}",
                  f"{r['ttft_p50_ms']:.1f} / {r['ttft_p99_ms']:.1f} / {r['ttft_max_ms']:.1f}",
                  f"{r['gap_p50_ms']:.2f} / {r['gap_p99_ms']:.2f}", f"{r['tokens_per_chunk']:.2f}",
                  f"{r['send_spread_ms']:.1f} / {r['stream_p50_ms']:.1f} / {r['stream_max_ms']:.1f}",
                  f"{r['client_cpu']:.2f}", f"{r.get('http_cpu_us_per_token', 0):.1f}",
                  f"{r.get('server_ttft_ms', 0):.1f} / {r.get('queue_ms', 0):.1f} / {r.get('prefill_ms', 0):.1f}",
                  f"{r.get('step_prefill_count', 0):.0f} × {r.get('step_prefill_ms', 0):.2f}, "
                  f"{r.get('step_decode_count', 0):.0f} × {r.get('step_decode_ms', 0):.2f}"] for r in rows])
    save_json(rows, args.json)


# the server's histograms whose sums and counts over one HTTP run say where its time went (short names): per
# request, from its arrival (made by the HTTP side) to its first token, its wait for a slot, and its prefill; per
# engine step (by kind), the step's own time
SERVER_BOOKS = {"mamba_server_time_to_first_token_seconds": "server_ttft",
                "mamba_server_request_queue_time_seconds": "queue", "mamba_server_request_prefill_time_seconds":
                "prefill", "mamba_server_engine_step_seconds": "step"}


def server_books(url: str) -> dict[str, list[float]]:
    """`books_of` the server's /metrics."""
    return books_of(httpx.get(f"{url}/metrics").text)


def books_of(exposition: str) -> dict[str, list[float]]:
    """{short name (a step's with its kind): [sum, count]} of SERVER_BOOKS in a Prometheus exposition, summed over
    its engines."""
    books: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(exposition):
        if family.name not in SERVER_BOOKS:
            continue
        for sample in family.samples:
            part = sample.name.removeprefix(family.name)
            if part in ("_sum", "_count"):
                key = "_".join(filter(None, (SERVER_BOOKS[family.name], sample.labels.get("kind"))))
                books.setdefault(key, [0.0, 0.0])[part == "_count"] += sample.value
    return books


def books_row(before: dict[str, list[float]], after: dict[str, list[float]]) -> dict:
    """Means over one HTTP run, in ms: each request's server-side TTFT, queue and prefill; per kind of engine step
    its mean and count."""
    row = {}
    for key, (total, count) in after.items():
        total, count = total - before.get(key, [0.0, 0.0])[0], count - before.get(key, [0.0, 0.0])[1]
        row[f"{key}_ms"] = 1e3 * total / count if count else 0.0
        if key.startswith("step_"):
            row[f"{key}_count"] = count
    return row


def served_slots(url: str) -> int:
    """The server's state slots, as its /metrics reports them (sized at its start unless --max-batch-size)."""
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        if family.name == "mamba_server_state_slots":
            return int(family.samples[0].value)
    raise RuntimeError(f"{url}/metrics has no mamba_server_state_slots")


def measure(args, served: EngineConfig, counts: list[int], body: dict, url: str, server_pid: int) -> list[dict]:
    """Rounds of (HTTP at N streams, then the engine at the server's batch) for every N; the medians per N. With
    them, the CPU time of the server's first HTTP process (`server_pid`; with --api-server-count the others' is not
    counted) per streamed token."""
    model = load_model(args.model or DEFAULT_MODEL_DIR, device=args.device, dtype=args.dtype).model
    slots = served_slots(url)
    if served.threads:
        torch.set_num_threads(served.threads)
    # the server's settings, sized as it sizes them (its chunks, graphs, state dtype), at the batch it runs
    served = replace(sized(served, model.device, slot_bytes(model, ssm_state_dtype(model, served.ssm_state_dtype))),
                     max_batch_size=min(max(counts), slots))
    runner = ModelRunner(model, served)
    chunk, step_tokens = served.chunk, served.prefill_tokens
    runner.warm_up()
    freeze_startup_heap()  # as the server's processes: no full collection of the model's objects mid-round
    workers = args.client_processes
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    # the server's first request, and the client processes' start and imports, before any timing
    run_clients(pool, workers, url, workers, {**body, "max_tokens": 4})
    measured: dict[int, list[dict]] = {n: [] for n in counts}
    with torch.no_grad():
        for _ in range(args.rounds):
            for n in counts:
                before, cpu_before = server_books(url), cpu_seconds(server_pid)
                row = http_row(*run_clients(pool, workers, url, n, body))
                cpu_after = cpu_seconds(server_pid)
                row.update(books_row(before, server_books(url)))
                if cpu_before is not None and cpu_after is not None:
                    row["http_cpu_us_per_token"] = 1e6 * (cpu_after - cpu_before) / row["tokens"]
                row["engine_tokens_per_s"] = engine_tokens_per_s(runner, min(n, slots))
                row["round_tokens_per_s"] = round_tokens_per_s(runner, min(n, slots), body["prompt"],
                                                               body["max_tokens"], chunk, step_tokens,
                                                               row["engine_tokens_per_s"])
                measured[n].append(row)
                print_row({"streams": n, **row})
    if pool is not None:
        pool.shutdown()
    return [{"streams": n, "engine_batch": min(n, slots),
             **{key: statistics.median(r[key] for r in rows) for key in rows[0]},
             "ratio": statistics.median(r["http_tokens_per_s"] / r["engine_tokens_per_s"] for r in rows),
             "round_ratio": statistics.median(r["http_tokens_per_s"] / r["round_tokens_per_s"] for r in rows)}
            for n, rows in measured.items()]


if __name__ == "__main__":
    main()
