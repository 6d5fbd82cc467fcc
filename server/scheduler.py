"""Which work the next engine step does: pure bookkeeping, no model (tests drive it with fake outputs).

Each step runs at most one prefill, a batch of prompt chunks from several requests, then one
batched decode step for every DECODING request. Waiting requests take free state slots in arrival order.

The prefill batch: rows of L tokens. The requests that are prefilling take turns round-robin: the first in turn,
the head, fixes L (≤ `prefill_chunk` tokens of its prompt), and runs even alone past the budget. The others
join, in turn order, while the step's rows of L stay within `max_prefill_tokens`, each with a chunk of L tokens
where at least L of its prompt remain. Where rows may be padded (`pads`: `--prefill-padding`, for a model that
`runtime.pads_exactly`, as a pad position with Δ = 0 leaves the state as it was), a shorter rest of a prompt joins
too, padded, when it is at least half of L, and L is the longest chunk of a prefilling request within twice the
head's: a burst of prompts of different lengths prefills in a step or a few, not in one step per length. A
request whose prompt is not done goes to the back of the turns, so a short prompt that arrives during a long
prefill starts decoding after one chunk of the long one, not after all of them (and the long one advances in the
short one's batch meanwhile). A decimated request's prompt is one chunk, whatever its length, in a batch of its
own: decimation ranks the positions of the whole prompt at once, one sequence at a time.

A request with forks (n samples of one prompt) is admitted with all of them at once, each into its own slot;
only the request prefills, and the engine copies its state into the forks' slots when the prompt is done.

With prefix caching, `resume` says at admission how many of a prompt's first tokens a stored state covers (the
engine copies it into the slot before the step runs); the prompt's chunks start there.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
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
    prefill: list[PrefillChunk]  # prompt chunks, run as one batch (rows of the longest); empty when none is prefilling
    decode: list[Request]  # every DECODING request: one token each, in one batched model step
    finished: list[Request]  # finished before running (aborted, timed out): slots already freed, report them


class Scheduler:
    def __init__(self, config: EngineConfig, resume: Callable[[Request], int] | None = None, pads: bool = False):
        self.config = config
        self.resume = resume  # an admitted request's prompt tokens already computed (a cached prefix); None: 0
        self.pads = pads  # a batch's prompt chunks may differ in length (the model pads rows exactly)
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
        """Some request is queued or holds a slot: from its prefill's last chunk until the step's update, a request
        is in none of the running lists, but it holds its slot."""
        return bool(self.waiting) or self._holds_slots()

    def has_step(self) -> bool:
        """`has_work` that a step can move now: not only requests waiting for their grammar's compile (whose abort
        or deadline is then seen once a compile ends or another request comes)."""
        return self._holds_slots() or any(not r.compiling for r in self.waiting)

    def _holds_slots(self) -> bool:
        return bool(self.prefilling or self.decoding) or len(self.free_slots) < self.config.slots

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
        admitted, compiling = [], []
        while self.waiting and len(self.free_slots) >= len(self.waiting[0].group):
            request = self.waiting.popleft()
            if request.compiling:  # the next come first meanwhile; it keeps its place ahead of those left
                compiling.append(request)
                continue
            for member in request.group:
                member.slot = self.free_slots.pop()
                member.status = RequestStatus.PREFILLING
            if self.resume is not None:
                request.num_computed = self.resume(request)
            self.prefilling.append(request)
            admitted += request.group
        self.waiting.extendleft(reversed(compiling))
        output = SchedulerOutput(self.step, admitted, self._prefill_batch(), list(self.decoding), finished)
        self.step += 1
        return output

    def _prefill_batch(self) -> list[PrefillChunk]:
        """The step's prompt chunks (the rule in the module docstring), taken out of the turns; those whose
        prompt they do not finish go to the back, in batch order."""
        if not self.prefilling:
            return []
        head = self.prefilling.popleft()
        if head.decimates:  # one chunk: decimation ranks the positions of the whole prompt
            chunks = [PrefillChunk(head, head.num_computed, len(head.prompt_ids))]
        else:
            length = self._chunk_length(head)
            chunks = [PrefillChunk(head, head.num_computed, head.num_computed + min(head.prompt_left, length))]
            budget, turns = self.config.prefill_tokens - length, deque[Request]()
            for request in self.prefilling:
                take = min(request.prompt_left, length)
                if budget >= length and not request.decimates and (take == length or self.pads and 2 * take >= length):
                    chunks.append(PrefillChunk(request, request.num_computed, request.num_computed + take))
                    budget -= length
                else:
                    turns.append(request)
            self.prefilling = turns
        self.prefilling.extend(chunk.request for chunk in chunks if not chunk.last)
        return chunks

    def _chunk_length(self, head: Request) -> int:
        """The step's chunk length L: the head's chunk, or where rows may be padded, the longest chunk of another
        prefilling request within twice the head's (so the head's row is at least half real tokens)."""
        own = min(head.prompt_left, self.config.chunk)
        if not self.pads:
            return own
        others = (min(r.prompt_left, self.config.chunk) for r in self.prefilling if not r.decimates)
        return max([own, *(take for take in others if take <= 2 * own)])

    def update(self, output: SchedulerOutput, finished: dict[Request, RequestStatus]) -> None:
        """After the step ran: `finished` holds the requests the step ended (stop, length, error)."""
        for chunk in output.prefill:
            request = chunk.request
            request.num_computed = chunk.end
            if chunk.last:
                for member in request.group:
                    if member not in finished and not member.status.finished:
                        member.num_computed = request.num_computed
                        member.status = RequestStatus.DECODING
                        self.decoding.append(member)
        for request, status in finished.items():
            self.finish(request, status)

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
