"""A load test of a running server: R streamed requests, C at a time, each with a prompt of about N tokens.

Per request it records the time to the first token (send → first stream chunk that carries a choice, retries
included), the gaps between later chunks (the server sends one chunk per decode step, so a gap is one
inter-token latency) and the end-to-end time. Throughput is completion tokens (from each stream's usage chunk)
over the wall time of the whole run.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass

from tqdm import tqdm

from .client import AsyncClient
from .errors import APIError

PROMPT_WORD = "the"  # repeated to make a prompt; a byte-level BPE gives it one token per repetition or close to it
PERCENTILES = (50, 90, 99)


def repeated_word_prompt(words: int) -> str:
    return " ".join([PROMPT_WORD] * words)


async def prompt_of_about(client: AsyncClient, target_tokens: int) -> str:
    """A prompt of `target_tokens` tokens or close to it, without a tokenizer on this side: the server counts
    the tokens of two short repeated-word prompts (max_tokens 0, no generation), the count is taken to be
    linear in the number of words (tokens = a + b·words), and the word count is solved for the target."""
    counts = {}
    for words in (16, 32):
        completion = await client.complete(repeated_word_prompt(words), max_tokens=0)
        counts[words] = completion.usage.prompt_tokens
    per_word = (counts[32] - counts[16]) / 16
    if per_word <= 0:
        raise APIError(None, "bench_error", f"the prompt's token count does not grow with its words: {counts}")
    return repeated_word_prompt(max(1, round((target_tokens - (counts[16] - 16 * per_word)) / per_word)))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linearly interpolated between the closest ranks (numpy's default); nan if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class RequestTiming:
    """One streamed request, in seconds from its send."""

    first_token: float
    inter_token: list[float]  # gaps between consecutive chunks after the first
    end_to_end: float
    prompt_tokens: int
    completion_tokens: int


@dataclass
class BenchReport:
    concurrency: int
    requests: int
    failed: dict[str, int]  # "<status> <type>" → how many requests ended with that error
    duration_s: float  # wall time of the whole run
    target_prompt_tokens: int
    mean_prompt_tokens: float  # as the server counted them
    completion_tokens: int  # all requests together
    output_tokens_per_s: float
    total_tokens_per_s: float  # prompt and completion tokens
    # "ttft", "itl", "e2e" → {"p50": ms, "p90": ms, "p99": ms}; nan where no request succeeded
    latency_ms: dict[str, dict[str, float]]

    @classmethod
    def from_timings(cls, concurrency: int, requests: int, failed: Counter, duration: float, target: int,
                     timings: list[RequestTiming]) -> BenchReport:
        prompt = sum(t.prompt_tokens for t in timings)
        completion = sum(t.completion_tokens for t in timings)
        series = {"ttft": [t.first_token for t in timings],
                  "itl": [gap for t in timings for gap in t.inter_token],
                  "e2e": [t.end_to_end for t in timings]}
        latency = {name: {f"p{q}": 1000 * percentile(values, q) for q in PERCENTILES}
                   for name, values in series.items()}
        return cls(concurrency, requests, dict(failed), duration, target, prompt / max(1, len(timings)), completion,
                   completion / duration, (prompt + completion) / duration, latency)

    def as_json(self) -> dict:
        """JSON-ready: a nan percentile (no sample) becomes None, which JSON can say."""
        report = asdict(self)
        report["latency_ms"] = {name: {q: None if math.isnan(ms) else ms for q, ms in row.items()}
                                for name, row in self.latency_ms.items()}
        return report

    def as_text(self) -> str:
        ok = self.requests - sum(self.failed.values())
        failures = ", ".join(f"{n} × {kind}" for kind, n in self.failed.items()) or "none failed"
        lines = [
            f"requests       {ok} of {self.requests} succeeded ({failures}) in {self.duration_s:.2f} s, "
            f"concurrency {self.concurrency}",
            f"prompt         {self.mean_prompt_tokens:.1f} tokens per request (asked for {self.target_prompt_tokens}: "
            f"the word {PROMPT_WORD!r} repeated)",
            f"completion     {self.completion_tokens} tokens in all",
            f"throughput     {self.output_tokens_per_s:.1f} output tokens/s, "
            f"{self.total_tokens_per_s:.1f} total tokens/s",
            f"{'latency (ms)':<14}" + "".join(f"{f'p{q}':>10}" for q in PERCENTILES),
        ]
        names = {"ttft": "time to first", "itl": "inter-token", "e2e": "end to end"}
        for key, name in names.items():
            lines.append(f"{name:<14}" + "".join(f"{self.latency_ms[key][f'p{q}']:>10.2f}" for q in PERCENTILES))
        return "\n".join(lines)


async def _timed_stream(client: AsyncClient, prompt: str, max_tokens: int, params: dict) -> RequestTiming:
    started = time.perf_counter()
    arrivals, usage = [], None
    async for chunk in client.stream(prompt, max_tokens=max_tokens, include_usage=True, **params):
        if chunk.choices:
            arrivals.append(time.perf_counter() - started)
        if chunk.usage is not None:
            usage = chunk.usage
    if not arrivals or usage is None:
        raise APIError(None, "bench_error", "the stream carried no token or no usage chunk")
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
    return RequestTiming(arrivals[0], gaps, time.perf_counter() - started, usage.prompt_tokens, usage.completion_tokens)


async def run_bench(client: AsyncClient, *, concurrency: int, prompt_tokens: int, requests: int, max_tokens: int,
                    progress: bool = True, **params) -> BenchReport:
    """`params` go into every request (scale_bucket, temperature, ...)."""
    prompt = await prompt_of_about(client, prompt_tokens)
    pending = iter(range(requests))  # shared by the workers: each takes the next request number
    timings: list[RequestTiming] = []
    failed: Counter = Counter()
    with tqdm(total=requests, unit="req", desc="bench", disable=not progress) as bar:
        async def worker() -> None:
            for _ in pending:
                try:
                    timings.append(await _timed_stream(client, prompt, max_tokens, params))
                except APIError as bad:
                    failed[f"{bad.status or '-'} {bad.type}"] += 1
                bar.update()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - started
    return BenchReport.from_timings(concurrency, requests, failed, duration, prompt_tokens, timings)
