"""A seeded sample through HTTP: the same text alone and decoded in a batch of others, as a user sends it.

Starts `python -m server` (a subprocess on a free loopback port) and sends one seeded, sampled completion alone,
then again together with `--batch` - 1 other sampled requests (each its own temperature, top-k and seed), all at
once over the project's AsyncClient. Reports whether the two texts are equal and how many decode steps the
server ran for each (from its /metrics): a batch of N decodes in about as many steps as one request alone when
its requests shared the steps. Exits with status 1 when the texts differ.

    python -m bench.seeded_batch --batch 32 -- --max-batch-size 32            # the embedded model on CPU
    python -m bench.seeded_batch --shape 130m --device cuda --batch 64
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from clients.client import AsyncClient

from .http_throughput import books_row, server_books
from .report import print_row, save_json
from .server_process import add_server_arguments, free_port, serve_shape, start_server

SEEDED = ("The old lighthouse keeper walked down to the shore and", {"temperature": 0.9, "top_p": 0.95, "seed": 5})


def others(count: int) -> list[tuple[str, dict]]:
    """Sampled requests (prompt, parameters) unlike the seeded one and unlike each other."""
    return [(f"Chapter {i}. It was", {"temperature": 0.5 + i / 20, "top_k": 10 + i, "seed": 100 + i})
            for i in range(count)]


async def texts(url: str, batch: int, max_tokens: int) -> tuple[str, str, dict, dict]:
    """The seeded text alone and in the batch, and the server's books over each of the two runs."""
    async with AsyncClient(url, timeout=3600, max_connections=batch) as client:
        before = server_books(url)
        alone = (await client.complete(SEEDED[0], **SEEDED[1], max_tokens=max_tokens)).choices[0].text
        between = server_books(url)
        answers = await asyncio.gather(*(client.complete(prompt, **params, max_tokens=max_tokens)
                                         for prompt, params in [SEEDED, *others(batch - 1)]))
        return alone, answers[0].choices[0].text, books_row(before, between), books_row(between, server_books(url))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_arguments(parser)
    parser.add_argument("--batch", type=int, default=32, help="requests sent together, the seeded one among them")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        serve_shape(args, Path(directory))
        port = free_port()
        server = start_server(args, port)
        try:
            alone, batched, alone_books, batch_books = asyncio.run(
                texts(f"http://127.0.0.1:{port}", args.batch, args.max_tokens))
        finally:
            server.terminate()
            server.wait(timeout=60)
    row = {"batch": args.batch, "same_text": alone == batched, "text": alone,
           "decode_steps_alone": alone_books.get("step_decode_count", 0),
           "decode_steps_batch": batch_books.get("step_decode_count", 0)}
    print_row(row)
    save_json(row, args.json)
    if not row["same_text"]:
        raise SystemExit(f"the seeded text differs in a batch of {args.batch}:\nalone: {alone!r}\nbatch: {batched!r}")


if __name__ == "__main__":
    main()
