"""Which work the next engine step does: pure bookkeeping, no model (tests drive it with fake outputs).

Each step runs at most one prefill chunk of ≤ `prefill_chunk` prompt tokens (None: whole prompts), then one
batched decode step for every DECODING request. Waiting requests take free state slots in arrival order; requests that are
prefilling share the chunks round-robin, so a short prompt that arrives during a long prefill starts decoding
after one chunk of the long one, not after all of them. A decimated request's prompt is one chunk, whatever
its length: decimation ranks the positions of the whole prompt at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .config import EngineConfig
from .errors import QueueFullError
from .request import Request, RequestStatus


@dataclass(frozen=True)
class PrefillChunk:
    request: Request
    start: int  # first prompt position of the chunk
    end: int  # one past the last; `end == len(prompt)` on the last chunk

    @property
    def last(self) -> bool:
        return self.end == len(self.request.prompt_ids)


@dataclass
class SchedulerOutput:
    step: int  # index of this engine step, from 0
    admitted: list[Request]  # left the queue for a slot this step (their queue time ends now)
    prefill: PrefillChunk | None  # the one prompt chunk this step runs, if any request is prefilling
    decode: list[Request]  # every DECODING request: one token each, in one batched model step
    finished: list[Request]  # finished before running (aborted, timed out): slots already freed, report them


class Scheduler:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.waiting: deque[Request] = deque()
        self.prefilling: deque[Request] = deque()  # round-robin order
        self.decoding: list[Request] = []
        self.free_slots: list[int] = list(range(config.max_batch_size - 1, -1, -1))  # pop() gives the lowest
        self.step = 0

    @property
    def running(self) -> list[Request]:
        return [*self.prefilling, *self.decoding]

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    def add(self, request: Request) -> None:
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFullError(f"the server is busy: {len(self.waiting)} requests are waiting "
                                 f"(--max-queue {self.config.max_queue}); retry later")
        self.waiting.append(request)

    def schedule(self, now: float) -> SchedulerOutput:
        finished = []
        for request in [*self.waiting, *self.running]:
            if request.abort_requested:
                finished.append(self.finish(request, RequestStatus.FINISHED_ABORTED))
            elif request.deadline is not None and now >= request.deadline:
                finished.append(self.finish(request, RequestStatus.FINISHED_TIMEOUT))
        admitted = []
        while self.waiting and self.free_slots:
            request = self.waiting.popleft()
            request.slot = self.free_slots.pop()
            request.status = RequestStatus.PREFILLING
            self.prefilling.append(request)
            admitted.append(request)
        chunk = None
        if self.prefilling:
            request = self.prefilling.popleft()
            whole = request.decimation is not None or self.config.prefill_chunk is None
            chunk_len = len(request.prompt_ids) if whole else self.config.prefill_chunk
            end = min(request.num_computed + chunk_len, len(request.prompt_ids))
            chunk = PrefillChunk(request, request.num_computed, end)
            if not chunk.last:
                self.prefilling.append(request)
        return SchedulerOutput(self.step, admitted, chunk, list(self.decoding), finished)

    def update(self, output: SchedulerOutput, finished: dict[Request, RequestStatus]) -> None:
        """After the step ran: `finished` holds the requests the step ended (stop, length, error)."""
        if output.prefill is not None:
            request = output.prefill.request
            request.num_computed = output.prefill.end
            if output.prefill.last and request not in finished:
                request.status = RequestStatus.DECODING
                self.decoding.append(request)
        for request, status in finished.items():
            self.finish(request, status)
        self.step += 1

    def finish(self, request: Request, status: RequestStatus) -> Request:
        """Ends `request` wherever it is and frees its slot."""
        assert status.finished, f"{status} is not a finished status"
        if request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        elif request in self.prefilling:
            self.prefilling.remove(request)
        elif request in self.decoding:
            self.decoding.remove(request)
        if request.slot is not None:
            self.free_slots.append(request.slot)
            self.free_slots.sort(reverse=True)
            request.slot = None
        request.status = status
        return request
