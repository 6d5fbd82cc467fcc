"""Passkey retrieval through HTTP, as a user meets it: the served model asked over /v1/completions (the project's
AsyncClient, greedy) for the key hidden in prompts cut from each domain's text, with `scale_bucket` "auto" (the
bank's choice for the prompt's length) and "none" (the base model), in one run. Beside it, with `--in-process`,
extend.evaluate's teacher-forced scoring of the same samples on the same model in this process: the two agree
where the server applies the bank's scales as the evaluation does, in the prefill and in every decode step.

A sample is retrieved through HTTP when its greedy completion of as many tokens as the answer has is the
answer's text (" 12345"); the samples are extend.evaluate's (the same seed, depths spread over 0-100%), so the
tables compare cell by cell.

    python -m bench.http_passkey --data books=GUTENBERG/eval.jsonl.xz,docs=DOMAINS/python-docs.jsonl.xz@eval,filler \
        --templates line,reworded --lengths 4k --samples 50 --in-process
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from clients.client import AsyncClient
from extend.objectives import passkey_accuracy, passkey_samples
from extend.passkey import parse_templates
from extend.sources import Domain, parse_sources, read_source
from runtime import load_model
from runtime.tokenizer import find_tokenizer
from scale_bank import Bank, parse_buckets, select
from server.config import DEFAULT_MODEL_DIR

from .report import print_row, print_table, save_json
from .server_process import add_server_arguments, free_port, start_server


async def retrieved(client: AsyncClient, prompts: list[list[int]], answers: list[list[int]], text_of, bucket: str,
                    concurrency: int) -> tuple[float, str | None]:
    """(fraction of `prompts` whose greedy completion of as many tokens as its answer is the answer's text, the
    bucket that served them)."""
    gate = asyncio.Semaphore(concurrency)

    async def ask(prompt: list[int], answer: list[int]) -> tuple[bool, str | None]:
        async with gate:
            completion = await client.complete(prompt, max_tokens=len(answer), temperature=0, scale_bucket=bucket)
            return completion.text == text_of(answer), completion.scale_bucket

    results = await asyncio.gather(*(ask(p, a) for p, a in zip(prompts, answers)))
    return sum(hit for hit, _ in results) / len(results), results[0][1]


async def base_and_bank(url: str, prompts: list[list[int]], answers: list[list[int]], text_of,
                        concurrency: int) -> list[tuple[float, str | None]]:
    """`retrieved` with scale_bucket "none", then "auto"."""
    async with AsyncClient(url, timeout=3600) as client:
        return [await retrieved(client, prompts, answers, text_of, bucket, concurrency) for bucket in ("none", "auto")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_arguments(parser)
    parser.add_argument("--data", required=True, help="domains as extend.evaluate takes them: NAME=PATH[@eval], filler")
    parser.add_argument("--templates", default="line")
    parser.add_argument("--lengths", default="4k", help="prompt + answer tokens of a sample")
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--in-process", action="store_true", help="also extend.evaluate's scoring in this process")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    model_dir = args.model or DEFAULT_MODEL_DIR
    tokenizer = find_tokenizer(model_dir, args.tokenizer)
    domains = [Domain.of(spec.name, read_source(spec), tokenizer) for spec in parse_sources(args.data.split(","))]
    templates, lengths = parse_templates(args.templates), parse_buckets(args.lengths)
    cells = [(d, t, n) for d in domains for t in templates for n in lengths]
    port = free_port()
    server = start_server(args, port)
    rows = []
    try:
        for domain, template, length in cells:
            batch = passkey_samples(tokenizer, domain.haystack, length, args.samples, args.seed, template)
            prompts, answers = [], []  # token ids before and of the answer
            for tokens, in_answer in zip(batch.tokens.tolist(), batch.answer_mask.tolist()):
                start = in_answer.index(True)
                prompts.append(tokens[:start])
                answers.append(tokens[start:])
            row = {"domain": domain.name, "template": template.name, "length": length}
            started = time.perf_counter()
            (row["http_base"], _), (row["http_bank"], row["bucket"]) = asyncio.run(base_and_bank(
                f"http://127.0.0.1:{port}", prompts, answers, tokenizer.decode, args.concurrency))
            row["http_seconds"] = round(time.perf_counter() - started, 1)
            rows.append(row)
    finally:
        server.terminate()
        server.wait()
    if args.in_process:
        loaded = load_model(model_dir, device=args.device, dtype=args.dtype)
        bank = Bank.load(model_dir / "bank", loaded.config, loaded.fingerprint, loaded.quantization)
        for row, (domain, template, length) in zip(rows, cells):
            # the scales extend.evaluate chooses for the length
            choice = select(bank, length, "auto", loaded.config.training_context_length)
            for name, scales in (("in_process_base", None), ("in_process_bank", choice.extension.scales)):
                row[name], _ = passkey_accuracy(loaded.model, tokenizer, domain.haystack, length, args.samples,
                                                scales, args.seed, batch_size=5, template=template)
    for row in rows:
        print_row(row)
    columns = ["http_base", "http_bank"] + (["in_process_base", "in_process_bank"] if args.in_process else [])
    print_table(["domain", "template", "tokens", "bucket", *columns],
                [[str(r["domain"]), str(r["template"]), f"{r['length']:,}", str(r["bucket"]),
                  *(f"{r[c]:.0%}" for c in columns)]
                 for r in rows])
    save_json(rows, args.json)


if __name__ == "__main__":
    main()
