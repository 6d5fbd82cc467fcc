"""How many decode steps an overlapped launch runs back to back (`--num-scheduler-steps`).

Several steps a launch share the host's books of a launch (scheduling, the hand-over of outputs, the HTTP side's
streamed chunk), which pays when those books outlast the steps: small models, many streams. They cost the streams
their granularity (tokens arrive several at a time) and a new request its wait for the launch in flight, which is
wasted where the device is the bottleneck anyway. `auto` therefore follows who waits on whom: when the host comes
to launch the next steps and finds the device already done with those in flight, the device sat idle on the host,
and the next launch runs one step more; when the device is still busy, the host is ahead, and it runs one fewer.
The count settles where the steps of a launch last about as long as the host's books of it.
"""

from __future__ import annotations

AUTO_MOST_STEPS = 4  # auto's ceiling: tokens reach a client at most this many at a time


class StepCount:
    def __init__(self, fixed: int | None) -> None:
        """`fixed`: that many steps every launch; None: `auto`, 1 to AUTO_MOST_STEPS, starting at 1."""
        self.fixed = fixed
        self.steps = fixed or 1

    def next(self, device_idle: bool | None) -> int:
        """The steps of the next launch. `device_idle`: whether the launch in flight had finished when the host came
        to launch this one; None where none was in flight (nothing learnt)."""
        if self.fixed is None and device_idle is not None:
            self.steps = min(self.steps + 1, AUTO_MOST_STEPS) if device_idle else max(self.steps - 1, 1)
        return self.steps
