"""Time to first token of a long prompt through HTTP, against the runtime's own tokenisation + prefill.

Starts `python -m server` (a subprocess on a free loopback port), streams one completion of a prompt of
about `--tokens` tokens (text, so the server tokenises it) and records the time to the first streamed token.
With `--race`, a short request is sent `--race-delay` seconds later and its first token time is recorded too
(it must not wait for the long prompt's prefill). The peer, measured in this process on the same model and
device after the server has finished: the tokenizer's encode of the same text plus `MambaLM.prefill` of the
whole prompt (last-token logits), after a warm-up.

    python -m bench.http_ttft --tokens 60000 --race                          # the embedded model, on CPU
    python -m bench.http_ttft --shape 130m --device cuda --tokens 60000      # a random 130m-shaped model
    python -m bench.http_ttft --model DIR --tokenizer T --device cuda --tokens 60000 --text BOOKS

`--shape` serves a random model of that shape (bench.random_model) with the embedded model's tokenizer.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import torch

from clients.client import Client
from extend.data import read_documents
from runtime import load_model
from runtime.tokenizer import find_tokenizer
from server.config import DEFAULT_MODEL_DIR

from .report import print_row, save_json
from .server_process import REPO, add_server_arguments, free_port, serve_shape, start_server


def prompt_text(tokenizer, source: Path | None, tokens: int) -> str:
    """About `tokens` tokens of text: the documents of `source`, or this repository's README repeated."""
    text = "\n\n".join(d.text for d in read_documents([source])) if source else (REPO / "README.md").read_text()
    ids = tokenizer.encode(text)
    while len(ids) < tokens:
        text, ids = text + "\n\n" + text, ids + ids
    return tokenizer.decode(ids[:tokens])


def first_token_seconds(client: Client, prompt: str, sent: float) -> float:
    """Seconds from `sent` to the first stream chunk that carries generated text."""
    for chunk in client.stream(prompt, max_tokens=4, temperature=0):
        if chunk.choices:
            return time.perf_counter() - sent
    raise RuntimeError("the stream ended without a token")


def measure_http(args, prompt: str) -> dict:
    port = free_port()
    server = start_server(args, port)
    try:
        with Client(f"http://127.0.0.1:{port}", timeout=600) as client:
            first_token_seconds(client, "warm up", time.perf_counter())
            results = {}
            racer = None
            if args.race:
                def race():
                    time.sleep(args.race_delay)
                    with Client(f"http://127.0.0.1:{port}", timeout=600) as other:
                        results["short_first_token_s"] = args.race_delay + first_token_seconds(
                            other, "The river ran past the mill", time.perf_counter())
                racer = threading.Thread(target=race)
                racer.start()
            results["long_first_token_s"] = first_token_seconds(client, prompt, time.perf_counter())
            if racer is not None:
                racer.join()
            return results
    finally:
        server.terminate()
        server.wait(timeout=60)


def measure_runtime(args, prompt: str) -> dict:
    loaded = load_model(args.model or DEFAULT_MODEL_DIR, device=args.device, dtype=args.dtype)
    tokenizer = find_tokenizer(loaded.path, args.tokenizer)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    tokens = torch.tensor([tokenizer.encode(prompt)], device=args.device)
    loaded.model.prefill(tokens[:, :2048])  # warm-up
    sync()
    start = time.perf_counter()
    ids = tokenizer.encode(prompt)
    encoded = time.perf_counter()
    loaded.model.prefill(torch.tensor([ids], device=args.device))
    sync()
    done = time.perf_counter()
    return {"prompt_tokens": len(ids), "tokenise_s": encoded - start, "prefill_s": done - encoded}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_arguments(parser)
    parser.add_argument("--tokens", type=int, default=60000)
    parser.add_argument("--text", type=Path, help="documents to take the prompt from (default: README.md repeated)")
    parser.add_argument("--race", action="store_true", help="also send a short request --race-delay s later")
    parser.add_argument("--race-delay", type=float, default=1.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        serve_shape(args, Path(directory))
        tokenizer = find_tokenizer(args.model or DEFAULT_MODEL_DIR, args.tokenizer)
        prompt = prompt_text(tokenizer, args.text, args.tokens)
        row = {"shape": args.shape, **measure_http(args, prompt), **measure_runtime(args, prompt)}
    row["ratio"] = row["long_first_token_s"] / (row["tokenise_s"] + row["prefill_s"])
    print_row(row, digits=3)
    save_json(row, args.json)


if __name__ == "__main__":
    main()
