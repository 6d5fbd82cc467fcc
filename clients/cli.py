"""`python -m clients complete|bench`: one completion printed as it streams, or a load test with latency
percentiles. Exit status: 0 done, 1 the server answered with an error (or, for bench, any request failed),
2 bad arguments."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from .bench import run_bench
from .client import DEFAULT_BASE_URL, DEFAULT_TIMEOUT, AsyncClient, Client
from .errors import APIError
from .retry import RetryPolicy
from .types import CompletionObject, StreamChunk

API_KEY_VARIABLE = "MAMBA_EXTEND_API_KEY"  # read when --api-key is not given, so the key need not sit in argv


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"the server (default: {DEFAULT_BASE_URL})")
    common.add_argument("--api-key", default=os.environ.get(API_KEY_VARIABLE),
                        help=f"the server's --api-key (default: ${API_KEY_VARIABLE})")
    common.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds to connect and between two reads of an answer")
    common.add_argument("--retries", type=int, default=RetryPolicy.max_retries,
                        help="retries of a request answered 429 or 503 (honouring Retry-After)")
    common.add_argument("--bucket", help="scale bucket: auto (the server's choice), none, or a bank bucket (8k, ...)")
    common.add_argument("--temperature", type=float, help="0: greedy (default: the server's, 1)")
    common.add_argument("--seed", type=int, help="sampling seed")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    parser = argparse.ArgumentParser(prog="python -m clients", description="Client of mamba-extend-server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    complete = commands.add_parser("complete", parents=[common], help="one completion, printed as it comes",
                                   description="Prints the completion's text on standard output and its scale "
                                   "bucket and token counts on standard error. With --json: the completion "
                                   "object, or with --stream one chunk object per line.")
    complete.add_argument("--prompt-file", type=Path, required=True, help="the prompt, sent as it is; '-': stdin")
    complete.add_argument("--max-tokens", type=int, default=16)
    complete.add_argument("--stream", action="store_true", help="print tokens as the server sends them")
    bench = commands.add_parser("bench", parents=[common], help="load test: time to first token, inter-token "
                                "latency, tokens/s", description="Streams --requests completions, --concurrency "
                                "at a time, each with a prompt of about --prompt-tokens tokens (a repeated word, "
                                "sized by the server's own token counts), and reports latency percentiles.")
    bench.add_argument("--concurrency", type=_positive_int, required=True)
    bench.add_argument("--prompt-tokens", type=_positive_int, required=True)
    bench.add_argument("--requests", type=_positive_int, required=True)
    bench.add_argument("--max-tokens", type=_positive_int, default=32)
    return parser


def _sampling(args: argparse.Namespace) -> dict:
    return {"temperature": args.temperature, "seed": args.seed, "scale_bucket": args.bucket}


def _summary(obj: CompletionObject) -> str:
    usage = obj.usage
    tokens = "" if usage is None else f", {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens"
    beyond = " (beyond the largest bucket)" if obj.scale_beyond_largest else ""
    return f"[scale bucket {obj.scale_bucket}{beyond}{tokens}]"


def _read_prompt(path: Path) -> str:
    return sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")


def complete(args: argparse.Namespace) -> int:
    prompt = _read_prompt(args.prompt_file)
    params = {"max_tokens": args.max_tokens, **_sampling(args)}
    with Client(args.base_url, api_key=args.api_key, timeout=args.timeout,
                retry=RetryPolicy(max_retries=args.retries)) as client:
        if not args.stream:
            completion = client.complete(prompt, **params)
            if args.json:
                print(json.dumps(dataclasses.asdict(completion), ensure_ascii=False))
            else:
                print(completion.text)
                print(_summary(completion), file=sys.stderr)
            return 0
        last: StreamChunk | None = None
        for chunk in client.stream(prompt, include_usage=True, **params):
            if args.json:
                print(json.dumps(dataclasses.asdict(chunk), ensure_ascii=False), flush=True)
            else:
                print(chunk.text, end="", flush=True)
            last = chunk
        if not args.json:
            print()
            if last is not None:
                print(_summary(last), file=sys.stderr)
    return 0


def bench(args: argparse.Namespace) -> int:
    async def run():
        async with AsyncClient(args.base_url, api_key=args.api_key, timeout=args.timeout,
                               retry=RetryPolicy(max_retries=args.retries), max_connections=args.concurrency) as client:
            return await run_bench(client, concurrency=args.concurrency, prompt_tokens=args.prompt_tokens,
                                   requests=args.requests, max_tokens=args.max_tokens, **_sampling(args))

    report = asyncio.run(run())
    print(json.dumps(report.as_json()) if args.json else report.as_text())
    return 1 if report.failed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")  # retries show on stderr
    try:
        return {"complete": complete, "bench": bench}[args.command](args)
    except APIError as bad:
        print(f"error: {bad}" + (f" [param: {bad.param}]" if bad.param else ""), file=sys.stderr)
        return 1
    except OSError as bad:  # the prompt file
        print(f"error: {bad}", file=sys.stderr)
        return 1
