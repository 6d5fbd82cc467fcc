"""Timing a benchmark's variants on any device: every call waited for (a CUDA device's queue drained first), and
the variants taking turns a round at a time."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _wait() -> None:
    if _cuda_in_use():
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], min_repeats: int = 3, min_seconds: float = 0.5) -> tuple[float, float]:
    """(seconds per call, peak GiB of CUDA memory, 0 where CUDA is unused) after one warm-up call; calls repeat
    until `min_seconds` have passed (at least `min_repeats`), so that short calls are timed over enough of them to
    be steady."""
    _wait()
    if _cuda_in_use():
        torch.cuda.reset_peak_memory_stats()
    fn()
    _wait()
    start, calls = time.perf_counter(), 0
    while calls < min_repeats or time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
        _wait()
    seconds = (time.perf_counter() - start) / calls
    return seconds, torch.cuda.max_memory_allocated() / 2**30 if _cuda_in_use() else 0.0


def measure_in_turns(fns: dict[str, Callable[[], object]], rounds: int = 5,
                     min_seconds: float = 0.2) -> dict[str, tuple[float, float]]:
    """name -> (median over `rounds` of the seconds per call, peak GiB) for each of `fns`, which take turns a
    round at a time: a drift of the machine during the run (clocks, the host's other work) then touches every
    variant alike instead of whichever ran during it, which matters for ratios of a few percent."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            seconds, peaks[name] = measure(fn, min_repeats=1, min_seconds=min_seconds)
            times[name].append(seconds)
    return {name: (statistics.median(times[name]), peaks[name]) for name in fns}
