"""The objects a process makes before it serves (imported modules, the model's tables, the app, the warm-up's
graphs) live as long as it does, yet each of Python's full collections would traverse them all again: some
230,000 in an HTTP process that imported torch. Frozen once the process is ready (as vLLM's engine and API server
do), later collections look at the objects of requests and steps only."""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collects what start-up left as garbage, then moves every object left to the permanent generation."""
    gc.collect()
    gc.freeze()
