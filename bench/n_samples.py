"""n samples of one prompt in one request (`n`: one prefill, its state copied into n slots) against n separate
requests of that prompt sent at once (n prefills), through HTTP on the same server.

Starts `python -m server` (a subprocess on a free loopback port), then alternates, `--repeats` times: one
completion with `n` samples, and `n` concurrent completions of one sample each; every request has the same
prompt of about `--tokens` tokens (text) and `--max-tokens` sampled tokens. Reports the median wall time of
each and their ratio.

    python -m bench.n_samples --tokens 8000 --n 4                 # the embedded model, on CPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from runtime.tokenizer import find_tokenizer
from server.config import DEFAULT_MODEL_DIR

from .http_ttft import prompt_text
from .server_process import free_port, start_server
from .report import print_row, save_json


def timed_completions(url: str, bodies: list[dict]) -> float:
    """Seconds until every one of `bodies` (sent at once) is answered."""
    def post(body):
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
        response.raise_for_status()

    start = time.perf_counter()
    with ThreadPoolExecutor(len(bodies)) as pool:
        list(pool.map(post, bodies))
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: the embedded model)")
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--tokens", type=int, default=8000)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("server_args", nargs="*", help="more flags for the server, after --")
    args = parser.parse_args(argv)
    prompt = prompt_text(find_tokenizer(args.model or DEFAULT_MODEL_DIR, args.tokenizer), None, args.tokens)
    body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 1.0, "ignore_eos": True}
    port = free_port()
    server = start_server(args, port)
    url = f"http://127.0.0.1:{port}"
    try:
        timed_completions(url, [{**body, "max_tokens": 1}])  # warm-up
        one, separate = [], []
        for _ in range(args.repeats):
            one.append(timed_completions(url, [{**body, "n": args.n}]))
            separate.append(timed_completions(url, [body] * args.n))
    finally:
        server.terminate()
        server.wait(timeout=60)
    row = {"tokens": args.tokens, "n": args.n, "max_tokens": args.max_tokens,
           "one_request_n_s": statistics.median(one), "n_requests_s": statistics.median(separate)}
    row["ratio"] = row["one_request_n_s"] / row["n_requests_s"]
    print_row(row, digits=3)
    save_json(row, args.json)


if __name__ == "__main__":
    main()
