"""Prefix caching through HTTP: several questions about one long document, with and without the cache, in one run.

Two servers of the same model, one with `--enable-prefix-caching`; to each, in turns, the same sequence of
streamed greedy requests: a document of about `--tokens` tokens (this repository's README, repeated to length)
followed by a different question each time. Reports the median time to first token of the first request and of
the later ones on each server, the ratio, and whether both servers gave the same texts.

    python -m bench.prefix_cache [--tokens 8000] [--questions 4] [--rounds 2] [-- SERVER FLAGS]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx

from .server_process import REPO, add_server_arguments, free_port, start_server

QUESTIONS = [" What is this document about?", " Which flags does the server take?", " How is a bank built?",
             " What does the engine do?", " How are the scales chosen?", " What runs on the GPU?"]


def document(tokenizer_path: Path, tokens: int) -> str:
    """This repository's README repeated until it holds about `tokens` tokens."""
    from runtime.tokenizer import Tokenizer

    text = (REPO / "README.md").read_text()
    per_copy = len(Tokenizer(tokenizer_path).encode(text))
    return (text * (tokens // per_copy + 1))[:len(text) * tokens // per_copy]


def first_token(url: str, prompt: str) -> tuple[float, str]:
    """Seconds to the first streamed text of a greedy completion of `prompt`, and its whole text."""
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}
    start, first, text = time.perf_counter(), None, ""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                first = first or time.perf_counter()
                text += json.loads(line[6:])["choices"][0]["text"]
    assert first is not None, "no token came"
    return first - start, text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_arguments(parser)
    parser.add_argument("--tokens", type=int, default=8000, help="the document's length in tokens, about")
    parser.add_argument("--questions", type=int, default=4, help="requests a round, one question each")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each a new document (medians reported)")
    args = parser.parse_args(argv)
    from server.config import DEFAULT_MODEL_DIR

    model = args.model or DEFAULT_MODEL_DIR
    args.model = model
    text = document(args.tokenizer or model / "tokenizer.json", args.tokens)
    base_flags = list(args.server_args)
    servers = {}
    try:
        for name, extra in (("cache", ["--enable-prefix-caching"]), ("no cache", [])):
            args.server_args = [*base_flags, *extra]
            port = free_port()
            servers[name] = (start_server(args, port), f"http://127.0.0.1:{port}")
        times: dict[tuple[str, str], list[float]] = {}
        same = True
        for round_ in range(args.rounds):
            doc = f"Copy {round_}.\n{text}"  # a new document each round: nothing stored from the last
            texts: dict[str, list[str]] = {}
            for i, question in enumerate(QUESTIONS[:args.questions]):
                for name, (_, url) in servers.items():
                    seconds, answer = first_token(url, doc + question)
                    times.setdefault((name, "first" if i == 0 else "later"), []).append(seconds)
                    texts.setdefault(name, []).append(answer)
            same &= texts["cache"] == texts["no cache"]
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(60)
    print(f"prefix caching, a document of about {args.tokens:,} tokens, {args.questions} questions a round, "
          f"{args.rounds} rounds; the same texts with and without the cache: {same}")
    print("| request | TTFT with the cache (ms) | without (ms) | ratio |")
    print("|---|---|---|---|")
    for which in ("first", "later"):
        cached, plain = (statistics.median(times[(name, which)]) * 1000 for name in ("cache", "no cache"))
        print(f"| {which} | {cached:,.0f} | {plain:,.0f} | {cached / plain:.2f} |")


if __name__ == "__main__":
    main()
