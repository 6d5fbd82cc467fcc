"""Which work the next engine step does: pure bookkeeping, no model (tests drive it with fake outputs).

Each step runs at most one prefill chunk of ≤ `prefill_chunk` prompt tokens (None: whole prompts), then one
batched decode step for every DECODING request. Waiting requests take free state slots in arrival order;
requests that are prefilling share the chunks round-robin, so a short prompt that arrives during a long
prefill starts decoding after one chunk of the long one, not after all of them. A decimated request's prompt
is one chunk, whatever its length: decimation ranks the positions of the whole prompt at once.

A request with forks (n samples of one prompt) is admitted with all of them at once, each into its own slot;
only the request prefills, and the engine copies its state into the forks' slots when the prompt is done.
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
        self.free_slots: list[int] = list(range(config.slots - 1, -1, -1))  # pop() gives the lowest
        self.step = 0

    @property
    def running(self) -> list[Request]:
        """Every request holding a slot: the prefilling ones with their forks, and the decoding ones."""
        return [*(m for r in self.prefilling for m in r.group if not m.status.finished), *self.decoding]

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    def add(self, *requests: Request) -> None:
        """Queues all of `requests` or, when the queue has no room for all of them, none."""
        if len(self.waiting) + len(requests) > self.config.max_queue:
            raise QueueFullError(f"the server is busy: {len(self.waiting)} requests are waiting "
                                 f"(--max-queue {self.config.max_queue}); retry later")
        self.waiting.extend(requests)

    def schedule(self, now: float) -> SchedulerOutput:
        finished = []
        for request in [*self.waiting, *self.running]:
            if request.abort_requested:
                finished += self.finish(request, RequestStatus.FINISHED_ABORTED)
            elif request.deadline is not None and now >= request.deadline:
                finished += self.finish(request, RequestStatus.FINISHED_TIMEOUT)
        admitted = []
        while self.waiting and len(self.free_slots) >= len(self.waiting[0].group):
            request = self.waiting.popleft()
            for member in request.group:
                member.slot = self.free_slots.pop()
                member.status = RequestStatus.PREFILLING
            self.prefilling.append(request)
            admitted += request.group
        chunk = None
        if self.prefilling:
            request = self.prefilling.popleft()
            chunk_len = self.config.prefill_chunk
            if chunk_len is None or request.extension.decimation is not None:  # the whole prompt in one chunk
                chunk_len = len(request.prompt_ids)
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
            if output.prefill.last:
                for member in request.group:
                    if member not in finished and not member.status.finished:
                        member.num_computed = request.num_computed
                        member.status = RequestStatus.DECODING
                        self.decoding.append(member)
        for request, status in finished.items():
            self.finish(request, status)
        self.step += 1

    def finish(self, request: Request, status: RequestStatus) -> list[Request]:
        """Ends `request` wherever it is and frees its slot; returns the requests this ended: none when it had
        already finished, and with it its forks when its prompt is not done (they cannot start without it)."""
        assert status.finished, f"{status} is not a finished status"
        if request.status.finished:
            return []
        if request in self.waiting:
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
        forks = request.forks if request.num_computed < len(request.prompt_ids) else []
        return [request, *(ended for fork in forks for ended in self.finish(fork, status))]
