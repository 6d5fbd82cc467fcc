"""Typed errors of the bank. Each names the file at fault and what is wrong with it."""

from __future__ import annotations

import os


class BankError(Exception):
    """A bank (manifest or tensor file) that cannot be used: missing, malformed, or for another model."""

    def __init__(self, path: str | os.PathLike[str], fault: str) -> None:
        self.path = str(path)
        self.fault = fault
        super().__init__(f"{self.path}: {fault}")


class UnknownBucketError(ValueError):
    """A request named a bucket the bank does not hold."""

    def __init__(self, requested: str, known: list[str]):
        self.requested = requested
        self.known = known
        names = ", ".join(known) if known else "none: no bank entries"
        super().__init__(f"unknown scale bucket {requested!r} (known: {names}; or 'auto', 'none')")
