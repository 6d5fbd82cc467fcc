"""What structured output costs through HTTP: the same streams with and without a constraint, in one run.

`python -m server` serves; N concurrent streaming clients each ask for `--max-tokens` tokens of a prompt, plain
or held to a constraint that cannot end before them: a regular expression over letters and spaces, and a JSON
schema of an array of at least 200 strings (`min_tokens` bans the end of text until then).
Rounds are interleaved and medians printed, with each constraint's output tokens/s as a share of the plain
streams' and the tokens a stream generated.

    python -m bench.guided_decoding [--streams 1,16] [--rounds 3] [-- SERVER FLAGS]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from pathlib import Path

from .http_throughput import run_streams
from .server_process import add_server_arguments, free_port, serve_shape, start_server

CONSTRAINTS: dict[str, dict] = {
    "none": {},
    "regex": {"guided_regex": "[a-z ]+"},
    "json schema": {"guided_json": {"type": "array", "items": {"type": "string"}, "minItems": 200}},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_arguments(parser)
    parser.add_argument("--streams", default="1,16", help="the numbers of concurrent streams")
    parser.add_argument("--max-tokens", type=int, default=128, help="completion tokens per stream")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.streams.split(",")]
    with tempfile.TemporaryDirectory() as directory:
        serve_shape(args, Path(directory))
        port = free_port()
        server = start_server(args, port)
        try:
            rows = measure(f"http://127.0.0.1:{port}", counts, args.max_tokens, args.rounds)
        finally:
            server.terminate()
            server.wait(60)
    print(f"structured output through HTTP, {args.max_tokens} tokens a stream, medians of {args.rounds} rounds")
    print("| streams | constraint | output tokens/s | ÷ no constraint | tokens a stream |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['streams']} | {row['constraint']} | {row['tokens_per_s']:,.0f} | {row['ratio']:.2f} "
              f"| {row['tokens_per_stream']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def measure(url: str, counts: list[int], max_tokens: int, rounds: int) -> list[dict]:
    """Median output tokens/s of each constraint at each stream count, the constraints interleaved per round."""
    rates: dict[tuple[int, str], list[float]] = {}
    lengths: dict[tuple[int, str], list[float]] = {}  # tokens a stream
    for _ in range(rounds):
        for n in counts:
            for name, fields in CONSTRAINTS.items():
                body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True}, "min_tokens": max_tokens, **fields}
                streams, wall, _ = asyncio.run(run_streams(url, n, body))
                tokens = sum(s.tokens for s in streams)
                rates.setdefault((n, name), []).append(tokens / wall)
                lengths.setdefault((n, name), []).append(tokens / n)
    rows = []
    for n in counts:
        plain = statistics.median(rates[(n, "none")])
        for name in CONSTRAINTS:
            rate = statistics.median(rates[(n, name)])
            rows.append({"streams": n, "constraint": name, "tokens_per_s": rate, "ratio": rate / plain,
                         "tokens_per_stream": statistics.median(lengths[(n, name)])})
    return rows


if __name__ == "__main__":
    main()
