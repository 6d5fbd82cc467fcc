"""When to retry a request and how long to wait first: 429 (queue full) and 503 (unavailable) only."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

RETRYABLE_STATUSES = frozenset({429, 503})  # the server is busy or briefly unable: the same request may succeed


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 4  # retries after the first try; 0: never retry
    backoff: float = 0.5  # seconds before the first retry when the server sends no Retry-After; doubles each retry
    max_backoff: float = 8.0  # cap on that doubling (a server's Retry-After is honoured as sent)

    def delay(self, retry: int, status: int, headers: Mapping[str, str]) -> float | None:
        """Seconds to wait before retry number `retry` (0-based) of a request answered with `status`; None: do
        not retry (the status is final, or the retries are spent)."""
        if status not in RETRYABLE_STATUSES or retry >= self.max_retries:
            return None
        after = retry_after_seconds(headers.get("retry-after"))
        if after is not None:
            return after
        # Jitter, so clients refused together do not all come back at the same instant.
        return min(self.max_backoff, self.backoff * 2 ** retry) * random.uniform(0.5, 1.0)


DEFAULT_RETRY = RetryPolicy()  # the clients' default: frozen, so one instance serves them all


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header (delta-seconds or an HTTP date) in seconds from now; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
