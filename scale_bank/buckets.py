"""Bucket names and lengths: "4k" ↔ 4096 tokens (k = 1024), "1.5k" ↔ 1536, "512" ↔ 512."""

from __future__ import annotations

import re
from decimal import Decimal

K = 1024
_LENGTH = re.compile(r"(\d+(?:\.\d+)?)([kK]?)\Z")
_MAX_DECIMALS = 3  # "1.125k" is still readable; beyond that a name is plain tokens ("1100")


def parse_length(text: str) -> int:
    """Tokens named by `text`: "4k" → 4096, "1.5k" → 1536, "512" → 512. ValueError naming the value."""
    match = _LENGTH.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"bad bucket length {text!r}: expected tokens like '512', '4k' or '1.5k' (k = 1024)")
    tokens = Decimal(match.group(1)) * (K if match.group(2) else 1)
    if tokens != tokens.to_integral_value():
        raise ValueError(f"bad bucket length {text!r}: {tokens} is not a whole number of tokens")
    if tokens <= 0:
        raise ValueError(f"bad bucket length {text!r}: must be positive")
    return int(tokens)


def parse_buckets(text: str) -> list[int]:
    """A comma-separated list ("4k,8k,16k") as lengths, shortest first; duplicates are refused."""
    lengths = [parse_length(part) for part in text.split(",")]
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"bad bucket list {text!r}: a length appears twice")
    return sorted(lengths)


def bucket_name(length: int) -> str:
    """The canonical name of a length: 4096 → "4k", 1536 → "1.5k", 512 → "512", 1100 → "1100"."""
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        raise ValueError(f"bad bucket length {length!r}: expected a positive number of tokens")
    kilo = Decimal(length) / K
    exponent = kilo.normalize().as_tuple().exponent  # an int: the value is finite
    if length >= K and isinstance(exponent, int) and -exponent <= _MAX_DECIMALS:
        return f"{kilo.normalize():f}k"
    return str(length)
