"""The engine alone: its decode steps against the model runner's own, in one run, no HTTP and no engine process.

N requests of a fixed prompt are submitted at once to an in-process `Engine` (the server's settings, flags after
`--`), each generating exactly `--max-tokens` tokens (`ignore_eos`), greedy or sampled (`--temperature`); then,
the engine idle, the peer: its model runner's decode steps at the same batch, greedy and read back, as the
engine's step runs them (bench.http_throughput's decode-only figure). Reported per N: the engine's mean decode
step (its step histogram) and the runner's, their ratio (what the engine adds to a step: the finish rules,
detokenising, sampling, the outputs), and tokens/s of the engine's round (its prefill and every step's books
included) and of the runner, and their ratio. What `bench.http_throughput` adds on top of this is the HTTP
side's and the hand-over's.

With `--profile`, the engine thread's functions by their own time over one more round (cProfile; the model's
operators are the `torch` rows).

    python -m bench.engine_steps --shape tiny --batch 1,16,64 -- --max-batch-size 64 --threads 1
    python -m bench.engine_steps --shape 130m --device cuda --batch 1,64,256 --profile -- --max-batch-size 256
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from runtime import load_model
from runtime.tokenizer import find_tokenizer
from server.config import DEFAULT_MODEL_DIR, parse_args
from server.detokenizer import OutputText
from server.engine import Engine
from server.metrics import Metrics
from server.request import Request, RequestOutput, SamplingParams

from .http_throughput import books_of, books_row, engine_tokens_per_s
from .report import print_row, print_table, save_json
from .server_process import add_server_arguments, add_workload_arguments, serve_shape, workload_prompt

PROFILED = 25  # functions listed by --profile


def engine_round(engine: Engine, batch: int, prompt: list[int], params: SamplingParams) -> float:
    """`batch` requests of `prompt` submitted together; seconds until the last one finished."""
    done = threading.Semaphore(0)

    def sink(output: RequestOutput) -> None:
        if output.finished:
            done.release()

    requests = [Request(f"r{i}", prompt, params, "none", OutputText(engine.tokenizer), sink) for i in range(batch)]
    start = time.perf_counter()
    engine.submit(*requests)
    for _ in requests:
        done.acquire()
    return time.perf_counter() - start


def profiled_round(engine: Engine, batch: int, prompt: list[int], params: SamplingParams) -> None:
    """One more round with the engine thread's `_loop` body under cProfile; prints the functions by own time."""
    profiler = cProfile.Profile()
    run = engine._run

    def profiled(output):
        profiler.enable()
        try:
            return run(output)
        finally:
            profiler.disable()

    engine._run = profiled  # type: ignore[method-assign]
    try:
        engine_round(engine, batch, prompt, params)
    finally:
        engine._run = run  # type: ignore[method-assign]
    print(f"engine thread, batch {batch}: functions by own time")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(PROFILED)


def measure(engine: Engine, metrics: Metrics, batch: int, prompt: list[int], params: SamplingParams,
            rounds: int) -> dict:
    """One batch's row: the engine's rounds (their decode steps from its histogram), then the runner's."""
    engine_round(engine, batch, prompt, params)  # warm: this batch's shapes
    before = books_of(metrics.exposition().decode())
    seconds = statistics.median(engine_round(engine, batch, prompt, params) for _ in range(rounds))
    books = books_row(before, books_of(metrics.exposition().decode()))
    runner_tokens_per_s = statistics.median(engine_tokens_per_s(engine.runner, batch) for _ in range(rounds))
    runner_step_ms = 1e3 * batch / runner_tokens_per_s
    row = {"batch": batch, "engine_step_ms": books["step_decode_ms"], "runner_step_ms": runner_step_ms,
           "step_ratio": books["step_decode_ms"] / runner_step_ms,
           "engine_tokens_per_s": batch * params.max_tokens / seconds, "runner_tokens_per_s": runner_tokens_per_s}
    row["round_ratio"] = row["engine_tokens_per_s"] / runner_tokens_per_s
    print_row(row)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_arguments(parser)
    parser.add_argument("--batch", default="1,16,64", help="requests submitted together")
    add_workload_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each batch; medians are reported")
    parser.add_argument("--profile", action="store_true", help="the engine thread's functions, largest batch")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    batches = [int(n) for n in args.batch.split(",")]
    config = parse_args(["--device", args.device, *args.server_args])[0].engine
    prompt = workload_prompt(args.prompt_tokens)
    params = SamplingParams(args.max_tokens, temperature=args.temperature, top_p=args.top_p, ignore_eos=True, seed=0)
    with tempfile.TemporaryDirectory() as directory:  # the model's, read again by the engine (its tokenizer)
        serve_shape(args, Path(directory))
        loaded = load_model(args.model or DEFAULT_MODEL_DIR, args.device, args.dtype)
        metrics = Metrics(loaded.model.device)
        engine = Engine(loaded.model, find_tokenizer(loaded.path, args.tokenizer), config, metrics)
        engine.warm_up()
        engine.start()
        engine.guides.preload()  # waits for the engine's own preload (a thread that competes for the interpreter)
        torch.set_num_threads(engine.config.threads or torch.get_num_threads())  # the peer with the engine's threads
        try:
            rows = [measure(engine, metrics, batch, prompt, params, args.rounds) for batch in batches]
            if args.profile:
                profiled_round(engine, max(batches), prompt, params)
        finally:
            engine.stop()
    print_table(["batch", "engine decode step ms", "runner decode step ms", "ratio", "engine round tokens/s",
                 "runner decode tokens/s", "ratio"],
                [[str(r["batch"]), f"{r['engine_step_ms']:.3f}", f"{r['runner_step_ms']:.3f}", f"{r['step_ratio']:.2f}",
                  f"{r['engine_tokens_per_s']:,.0f}", f"{r['runner_tokens_per_s']:,.0f}", f"{r['round_ratio']:.2f}"]
                 for r in rows])
    save_json(rows, args.json)


if __name__ == "__main__":
    main()
