"""Which bank entry serves a request (DESIGN.md §4), as a pure function of the bank and the request.

A request that will reach `n = prompt_tokens + max_tokens` tokens uses, under `scale_bucket = "auto"`:
no scales at or below the model's training length; else the smallest bucket whose length ≥ n; beyond the
largest bucket, the largest (and says so). `"none"` forces identity; a bucket name forces that entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime import ScaleSet

from .bank import Bank
from .errors import UnknownBucketError
from .manifest import BankEntry

AUTO, NONE = "auto", "none"


@dataclass(frozen=True)
class Selection:
    name: str  # bucket name to report in the response, or "none"
    reason: str  # why, in words, for logs and metrics
    entry: BankEntry | None = None  # the entry picked; None when no entry applies
    scales: ScaleSet | None = None  # what the model applies; None is identity (also for decimate and identity-kept entries)
    method: str | None = None  # what to apply: "delta", "a_spectrum", or "decimate" (read entry.params); None: nothing
    beyond_largest: bool = False  # n exceeded every bucket and the largest was used


def select(bank: Bank | None, n_tokens: int, requested: str = AUTO, training_length: int | None = None) -> Selection:
    """`training_length` defaults to the one the bank records for its model. Raises UnknownBucketError when
    `requested` names no entry of the bank."""
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be ≥ 0, got {n_tokens}")
    if requested == NONE:
        return Selection(NONE, "requested none")
    if requested != AUTO:
        if bank is None:
            raise UnknownBucketError(requested, [])
        entry = bank.entry(requested)
        return _use(bank, entry, f"requested {entry.bucket}")
    if bank is None or not bank.manifest.entries:
        return Selection(NONE, "identity: no bank" if bank is None else "identity: the bank has no entries")
    if training_length is None:
        training_length = bank.manifest.model["training_context_length"]
    if training_length is not None and n_tokens <= training_length:
        return Selection(NONE, "identity: within training length")
    for entry in bank.manifest.entries:  # shortest first
        if entry.length >= n_tokens:
            return _use(bank, entry, f"bucket {entry.bucket}: smallest ≥ n ({n_tokens} tokens)")
    largest = bank.manifest.entries[-1]
    return _use(bank, largest, f"largest bucket {largest.bucket}: request exceeds every bucket ({n_tokens} tokens)",
                beyond_largest=True)


def _use(bank: Bank, entry: BankEntry, reason: str, beyond_largest: bool = False) -> Selection:
    if entry.chosen == "identity":  # the build found no scales better than none for this bucket
        return Selection(entry.bucket, f"{reason}; entry kept identity", entry, beyond_largest=beyond_largest)
    return Selection(entry.bucket, reason, entry, bank.scale_set(entry.bucket), entry.method, beyond_largest)
