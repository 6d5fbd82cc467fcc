"""A burst of prompts of different lengths: padded prefill rows against chunks of one length, or short prefill steps
replayed as CUDA graphs against launched one by one, in one run.

N requests whose prompts have lengths drawn (seeded) from a range are submitted at once to an in-process `Engine` (the
server's settings, flags after `--`; one engine a way, on the one model), each generating `--max-tokens` tokens (greedy,
`ignore_eos`); the rounds alternate two ways of prefilling them. `--compare padding` (the default): rows of different
lengths padded into one batch (`--prefill-padding on`) against chunks of one length only (`off`). `--compare graphs`
(CUDA): padded rows with the short steps' graphs (runtime.prefill_graph) against the same steps launched eagerly
(`--eager-prefill`). Reported per way: the prefill steps of a round, time to first token p50 / max (from submission),
the round's wall time, and the ratio of the rounds' times, the first way ÷ the second.

    python -m bench.prefill_burst --requests 64 --prompt-tokens 48-80            # the embedded model on CPU
    python -m bench.prefill_burst --shape 130m --device cuda --requests 64 --prompt-tokens 32-96 -- --max-batch-size 256
    python -m bench.prefill_burst --shape 130m --device cuda --compare graphs -- --max-batch-size 256
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from runtime import load_model, pads_exactly
from runtime.tokenizer import find_tokenizer
from server.config import DEFAULT_MODEL_DIR, parse_args
from server.detokenizer import OutputText
from server.engine import Engine
from server.metrics import Metrics
from server.request import Request, RequestOutput, SamplingParams

from .report import print_row, print_table, save_json
from .server_process import add_server_arguments, serve_shape, workload_prompt


def burst(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> dict:
    """The prompts submitted together: prefill steps, each request's first-token seconds, the round's seconds."""
    done = threading.Semaphore(0)
    first: dict[str, float] = {}
    start = 0.0

    def sink(output: RequestOutput) -> None:
        if output.token_ids and output.request_id not in first:
            first[output.request_id] = time.perf_counter() - start
        if output.finished:
            done.release()

    requests = [Request(f"r{i}", prompt, params, "none", OutputText(engine.tokenizer), sink)
                for i, prompt in enumerate(prompts)]
    logged = len(engine.step_log)
    start = time.perf_counter()
    engine.submit(*requests)
    for _ in requests:
        done.acquire()
    seconds = time.perf_counter() - start
    steps = list(engine.step_log)[logged:]
    return {"prefill_steps": sum(r.kind == "prefill" for r in steps), "ttft": sorted(first.values()),
            "seconds": seconds}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_arguments(parser)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", default="48-80", help="the range prompt lengths are drawn from")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each rule, alternating; medians reported")
    parser.add_argument("--compare", choices=("padding", "graphs"), default="padding")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    shortest, longest = (int(n) for n in args.prompt_tokens.split("-"))
    draw = random.Random(0)
    base = workload_prompt(longest)
    prompts = [base[i % 7:][:draw.randint(shortest, longest)] for i in range(args.requests)]
    params = SamplingParams(args.max_tokens, temperature=0.0, ignore_eos=True)
    config = parse_args(["--device", args.device, "--max-queue", str(args.requests), *args.server_args])[0].engine
    with tempfile.TemporaryDirectory() as directory:  # the model's, read again by the engine (its tokenizer)
        serve_shape(args, Path(directory))
        loaded = load_model(args.model or DEFAULT_MODEL_DIR, args.device, args.dtype)
        if not pads_exactly(loaded.config):
            raise SystemExit(f"{loaded.path}: a Mamba2 whose Δ floor (dt_limit) is above 0 does not pad rows exactly")
        tokenizer = find_tokenizer(loaded.path, args.tokenizer)
        settings = {"padded": replace(config, prefill_padding=True),
                    "one length": replace(config, prefill_padding=False)} if args.compare == "padding" else \
            {"graphs": replace(config, prefill_padding=True, prefill_graphs=True),
             "eager": replace(config, prefill_padding=True, prefill_graphs=False)}
        engines = {}  # one engine a way, on the one model: each its own state pool (and graphs)
        try:
            for way, setting in settings.items():
                engines[way] = Engine(loaded.model, tokenizer, setting, Metrics(loaded.model.device))
                engines[way].warm_up()
                engines[way].start()
            if args.compare == "graphs" and engines["graphs"].runner.prefill_graphs is None:
                raise SystemExit("--compare graphs: this engine has no prefill graphs (CUDA, exact padding, not eager)")
            runs: dict[str, list[dict]] = {way: [] for way in settings}
            for _ in range(args.rounds + 1):  # the first round of each way warms its shapes and is dropped
                for way, engine in engines.items():
                    runs[way].append(burst(engine, prompts, params))
        finally:
            for engine in engines.values():
                engine.stop()
    rows = []
    for way, rounds in runs.items():
        kept = rounds[1:]
        ttft = [statistics.median(r["ttft"]) for r in kept]
        rows.append({"way": way, "requests": args.requests, "prompt_tokens": args.prompt_tokens,
                     "prefill_steps": statistics.median(r["prefill_steps"] for r in kept),
                     "ttft_p50_ms": 1e3 * statistics.median(ttft),
                     "ttft_max_ms": 1e3 * statistics.median(r["ttft"][-1] for r in kept),
                     "round_s": statistics.median(r["seconds"] for r in kept)})
        print_row(rows[-1])
    ratio = rows[0]["round_s"] / rows[1]["round_s"]
    print_table(["prefill", "prefill steps", "TTFT p50 ms", "TTFT max ms", "round s"],
                [[r["way"], f"{r['prefill_steps']:.0f}", f"{r['ttft_p50_ms']:.1f}", f"{r['ttft_max_ms']:.1f}",
                  f"{r['round_s']:.3f}"] for r in rows])
    print(f"round time, {rows[0]['way']} ÷ {rows[1]['way']}: {ratio:.2f}")
    save_json(rows, args.json)


if __name__ == "__main__":
    main()
