"""Which bank entry serves a request (docs/ARCHITECTURE.md), as a pure function of the bank and the request.

A request that will reach `n = prompt_tokens + max_tokens` tokens uses, under `scale_bucket = "auto"`:
no extension at or below the model's training length; else the smallest bucket whose length ≥ n; beyond the
largest bucket, the largest (and says so). `"none"` forces identity; a bucket name forces that entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime import IDENTITY, Extension

from .bank import Bank
from .errors import UnknownBucketError
from .manifest import BankEntry

AUTO, NONE = "auto", "none"


@dataclass(frozen=True)
class Selection:
    name: str  # bucket name to report in the response, or "none"
    reason: str  # why, in words, for logs and metrics
    entry: BankEntry | None = None  # the entry picked; None when no entry applies
    extension: Extension = IDENTITY  # what the model applies (also IDENTITY for entries that kept identity)
    beyond_largest: bool = False  # n exceeded every bucket and the largest was used

    @property
    def method(self) -> str | None:
        """What is applied: "delta", "a_spectrum", "decimate", or None for nothing."""
        return self.extension.method


def select(bank: Bank | None, n_tokens: int, requested: str = AUTO, training_length: int | None = None) -> Selection:
    """`training_length` defaults to the one the bank records for its model (a decimation's `l_base` defaults
    to it too). Raises UnknownBucketError when `requested` names no entry of the bank."""
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be ≥ 0, got {n_tokens}")
    if requested == NONE:
        return Selection(NONE, "requested none")
    if bank is None:
        if requested != AUTO:
            raise UnknownBucketError(requested, [])
        return Selection(NONE, "identity: no bank")
    if training_length is None:
        training_length = bank.manifest.model["training_context_length"]
    if requested != AUTO:
        entry = bank.entry(requested)
        return _use(bank, entry, f"requested {entry.bucket}", training_length)
    if not bank.manifest.entries:
        return Selection(NONE, "identity: the bank has no entries")
    if training_length is not None and n_tokens <= training_length:
        return Selection(NONE, "identity: within training length")
    for entry in bank.manifest.entries:  # shortest first
        if entry.length >= n_tokens:
            return _use(bank, entry, f"bucket {entry.bucket}: smallest ≥ n ({n_tokens} tokens)", training_length)
    largest = bank.manifest.entries[-1]
    return _use(bank, largest, f"largest bucket {largest.bucket}: request exceeds every bucket ({n_tokens} tokens)",
                training_length, beyond_largest=True)


def _use(bank: Bank, entry: BankEntry, reason: str, training_length: int | None,
         beyond_largest: bool = False) -> Selection:
    extension = bank.extension(entry.bucket, training_length)
    kept = "; entry kept identity" if entry.chosen == "identity" else ""
    return Selection(entry.bucket, reason + kept, entry, extension, beyond_largest)
