"""Typed errors of the runtime. Each names the file (or field) at fault so a user can fix it."""

from __future__ import annotations

import os


class RuntimeErrorBase(Exception):
    """Base of every error the runtime raises on bad input."""


class CheckpointError(RuntimeErrorBase):
    """A checkpoint directory that cannot be loaded: missing file, bad config, bad tensor."""

    def __init__(self, path: str | os.PathLike[str], fault: str) -> None:
        self.path = str(path)
        self.fault = fault
        super().__init__(f"{self.path}: {fault}")


class BackendUnavailableError(RuntimeErrorBase):
    """A kernel back-end was asked for by name but cannot be used on this machine."""


class ScaleSetError(RuntimeErrorBase):
    """A scale set whose method, shape or values do not fit the model."""


class DecimationError(RuntimeErrorBase):
    """A decimation spec (DeciMamba) with a bad parameter, or applied where it cannot be."""
