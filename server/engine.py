"""The engine: one thread runs the scheduler's steps on the model runner and keeps the requests' books. The
server runs it in a process of its own (server.engine_process), on the HTTP side's messages.

Threads: the caller (the engine process's main thread) calls `submit` and `abort` (they only touch the scheduler
under `_cond`, and raise QueueFullError at once when the queue is full); the engine thread loops schedule → run
the model → update → hand each request's output to its `sink`. The model runs outside the lock, so submitting
never waits on it. With `overlap_decode` (on CUDA), a decode step is launched before the last one's tokens are
taken, which then land while the device computes it (`_overlaps` says when a step may); with
`num_scheduler_steps` k, such a launch is k decode steps, each from the tokens the one before chose on the device,
whose tokens land together: the host's books of a step (scheduling, the hand-over of outputs, and on the HTTP side
a streamed chunk) are paid once for k tokens a request (`auto`, the default, adapts k: server.multi_step).

Each request owns one row (slot) of the runner's state pool from admission to finish. A prefill step runs
several requests' prompt chunks of one length as one batch, each continuing its slot's state (or starting from
zeros), and samples the first token of every request whose prompt it finished in one batched computation; a
decode step steps the decoding rows as one batch. In both, each request has its own extension (every request its
own bucket) and its own generator (a seed gives the same text whatever else is batched with it). The runner
(server.model_runner) owns the pool, the scales and the CUDA graphs; the engine samples the tokens and applies
the finish rules (server.finish).
"""

from __future__ import annotations

import concurrent.futures
import logging
import random
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TypeVar
from collections.abc import Callable, Mapping

import torch

from runtime import Extension, MambaLM, pads_exactly
from runtime.device_copy import to_device
from runtime.tokenizer import Tokenizer

from .config import EngineConfig
from .engine_protocol import EngineStatus
from .errors import UnavailableError
from .finish import take_token
from .guided import Guides
from .logits_adjustment import adjusted
from .prefix_cache import PrefixCache
from .metrics import Metrics
from .model_runner import ModelRunner
from .multi_step import StepCount
from .request import FINISH_REASON, Request, RequestOutput, RequestStatus
from .sampling import choose, logprob_entries
from .scheduler import PrefillChunk, Scheduler, SchedulerOutput
from .slots import sized, slot_bytes, ssm_state_dtype

log = logging.getLogger(__name__)
Finished = dict[Request, RequestStatus]  # the requests a step finished
Outputs = dict[Request, RequestOutput]  # what a step adds to each request
Work = TypeVar("Work")


@dataclass(frozen=True)
class StepRecord:
    step: int  # engine step index
    kind: str  # "prefill" (a batch of prompt chunks) or "decode" (one token for each request)
    request_ids: tuple[str, ...]
    tokens: int  # prompt tokens of all the batch's chunks, or sequences in the decode batch
    prompts_done: tuple[str, ...] = ()  # prefill only: the requests whose prompt the step finished
    steps: int = 1  # decode steps launched together (num_scheduler_steps); their time is shared among them


@dataclass
class InFlight:
    """Decode steps launched whose tokens are not yet taken: their batch, and their tokens on the device, with a
    copy to the host started behind them (read at landing, when the device has gone on to the next step)."""

    output: SchedulerOutput
    requests: list[Request]
    tokens: torch.Tensor  # (k, b) int64 on the model's device: each step's, the last one's the next step's input
    record: StepRecord
    started: float  # perf_counter at launch
    host: torch.Tensor = field(init=False)  # (k, b) int64, pinned on CUDA
    ready: torch.cuda.Event | None = field(init=False)

    def __post_init__(self) -> None:
        on_cuda = self.tokens.device.type == "cuda"
        self.host = torch.empty(self.tokens.shape, dtype=self.tokens.dtype, pin_memory=on_cuda)
        self.host.copy_(self.tokens, non_blocking=on_cuda)
        self.ready = torch.cuda.Event() if on_cuda else None
        if self.ready is not None:
            self.ready.record()

    def done(self) -> bool:
        """Whether the device has finished these steps (on a CPU they ran as they were launched)."""
        return self.ready is None or self.ready.query()

    def read(self) -> list[list[int]]:
        """Each step's tokens, k lists of b."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


class Engine:
    def __init__(self, model: MambaLM, tokenizer: Tokenizer, config: EngineConfig, metrics: Metrics,
                 extensions: Mapping[str, Extension] | None = None) -> None:
        """`extensions`: what each scale bucket of the bank applies (the model runner's); none: identity only."""
        assert tokenizer.vocab_size <= model.config.vocab_size, "tokenizer larger than the model's vocabulary"
        self.model = model
        self.tokenizer = tokenizer
        self.guides = Guides(tokenizer)  # the grammar states of guided requests
        ssm_dtype = ssm_state_dtype(model, config.ssm_state_dtype)
        state_bytes = slot_bytes(model, ssm_dtype)
        self.config = config = sized(config, model.device, state_bytes)
        self.metrics = metrics
        metrics.slots.set(config.slots)
        metrics.slot_bytes.set(state_bytes)
        log.info("state slots: %d, %.2f MB of state each (SSM states in %s; %.1f MB in all); prefill: chunks of up "
                 "to %d tokens, up to %d prompt tokens a step", config.slots, state_bytes / 2**20,
                 str(ssm_dtype).removeprefix("torch."), config.slots * state_bytes / 2**20, config.chunk,
                 config.prefill_tokens)
        self.runner = ModelRunner(model, config, extensions)
        self.prefixes = PrefixCache(config.prefix_rows) if config.prefix_rows else None
        if self.prefixes is not None:
            log.info("prefix cache: %d states (%.1f MB)", config.prefix_rows, config.prefix_rows * state_bytes / 2**20)
        self._overlap = model.device.type == "cuda" if config.overlap_decode is None else config.overlap_decode
        self._in_flight: InFlight | None = None  # the decode step launched and not yet landed (overlap only)
        self._step_count = StepCount(config.num_scheduler_steps)
        padding = model.device.type == "cuda" if config.prefill_padding is None else config.prefill_padding
        self.scheduler = Scheduler(config, None if self.prefixes is None else self._resume,
                                   padding and pads_exactly(model.config))
        self.step_log: deque[StepRecord] = deque(maxlen=config.step_log_size)
        self._cond = threading.Condition()
        self._stopping = False
        self._stop_reason = "the engine stopped"  # what the requests still held when it stops are told
        self._closed = False  # admission closed (shutting down): submit refuses, the requests held run on
        # called on the engine thread once a step's outputs have all gone to their sinks: a sink that gathers
        # them (the engine process's outbox) sends them on then, one message a step
        self.handed_over: Callable[[], None] = lambda: None
        self._thread: threading.Thread | None = None
        self._default_threads: int  # set by `start`, read by the engine thread

    def warm_up(self) -> None:
        """The runner's warm-up (`ModelRunner.warm_up`) and the tokenizer's table of token bytes (tens of
        milliseconds for a large vocabulary, which the first request would wait for), before the server takes
        requests."""
        self.runner.warm_up()
        for skip_special in (False, True):
            self.tokenizer.byte_pieces(skip_special)

    # --- the caller's side ----------------------------------------------------------------------------

    def start(self) -> None:
        # after the warm-up: an import on another thread must not meet the decode graphs' capture
        threading.Thread(target=self.guides.preload, name="guides-preload", daemon=True).start()
        self._default_threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._loop, name="mamba-engine", daemon=True)
        self._thread.start()

    def stop(self, reason: str | None = None) -> None:
        """Stops the engine thread; every request still queued or running ends with an error saying `reason`."""
        with self._cond:
            self._stopping = True
            self._stop_reason = reason or self._stop_reason
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def close(self) -> None:
        """Takes no more requests (a graceful shutdown); those already queued or running go on."""
        with self._cond:
            self._closed = True

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, *requests: Request) -> None:
        """Queues all of `requests` (with their forks); raises QueueFullError, queueing none, when the queue
        has no room for all."""
        with self._cond:
            if not self.alive:
                raise UnavailableError("the engine is not running")
            if self._closed:
                raise UnavailableError("the server is shutting down", code="shutting_down")
            self.scheduler.add(*requests)
            for member in (m for request in requests for m in request.group):
                if member.params.guide is not None:
                    member.grammar = self.guides.compile_soon(member.params.guide)
                    member.grammar.add_done_callback(self._compiled)
            self.metrics.waiting.set(len(self.scheduler.waiting))
            self._cond.notify()

    def _compiled(self, _grammar: concurrent.futures.Future) -> None:
        """A waiting request's grammar is compiled: the engine thread may admit it now."""
        with self._cond:
            self._cond.notify()

    def abort(self, *requests: Request) -> None:
        """Cancels `requests` (no-op for those finished); their slots are freed at the next step."""
        with self._cond:
            for request in requests:
                request.abort_requested = True
            self._cond.notify()

    def status(self) -> EngineStatus:
        """Whether it runs, whether it holds requests, its free slots, its queue and whether it takes new requests,
        read at one moment."""
        with self._cond:
            return EngineStatus(self.alive, self.scheduler.has_work(), len(self.scheduler.free_slots),
                                len(self.scheduler.waiting), not self._closed)

    # --- the engine thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        # OpenMP's thread count is per OS thread: the engine thread sets its own (see server/engine_process.py).
        torch.set_num_threads(self.config.threads or self._default_threads)
        if self.model.device.type == "cuda":  # CUDA's current device is per thread too: Triton launches on it
            torch.cuda.set_device(self.model.device)
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self.scheduler.has_step() and self._in_flight is None:
                        self._cond.wait()
                    if self._stopping:
                        break
                    output = self.scheduler.schedule(time.monotonic())
                if self._overlaps(output):  # launch this step, then take the last one's tokens while it runs
                    finished: Finished = {}
                    outputs = {r: self._new_output(r) for r in output.finished}
                    landing = self._in_flight
                    self._in_flight = self._launch(output, finished, outputs)  # from the landing step's tokens
                    self._settle(output, finished, outputs)
                    if landing is not None:
                        self._settle(landing.output, *self._land(landing))
                else:  # the step in flight lands first: this one needs every request's books up to date
                    if self._in_flight is not None:
                        landing, self._in_flight = self._in_flight, None
                        self._settle(landing.output, *self._land(landing))
                        output = replace(output, decode=[r for r in output.decode if not r.status.finished])
                    self._settle(output, *self._run(output))
        except Exception:  # a fault outside the model (bookkeeping): nothing after it can be trusted
            log.exception("the engine loop failed; the engine stops")
        finally:
            self._drain()

    def _settle(self, output: SchedulerOutput, finished: Finished, outputs: Outputs) -> None:
        """After a step has run (or been launched): the scheduler's books, the gauges, the outputs handed over."""
        with self._cond:
            self.scheduler.update(output, finished)
            self.metrics.running.set(len(self.scheduler.running))
            self.metrics.waiting.set(len(self.scheduler.waiting))
        self._report(outputs)

    def _overlaps(self, output: SchedulerOutput) -> bool:
        """Whether `output` launches before the step in flight lands: a decode step alone (a prefill changes the
        books: admissions, prompts done), none of whose requests reads its tokens so far before its next choice
        (logit adjustments: penalties, min_tokens) or wants its logprobs (the logits are overwritten by the next
        step)."""
        return self._overlap and bool(output.decode) and not output.prefill and not output.admitted and all(
            not r.params.adjusts_logits and r.params.logprobs is None for r in output.decode)

    def _launch(self, output: SchedulerOutput, finished: Finished, outputs: Outputs) -> InFlight | None:
        """Launches `output`'s decode steps (num_scheduler_steps), their tokens chosen on the device, each step from
        the one before; None if they failed (their requests are then in `finished` with an error)."""
        requests = output.decode
        flying = self._in_flight
        steps = self._step_count.next(None if flying is None else flying.done())
        record = StepRecord(output.step, "decode", tuple(r.request_id for r in requests), len(requests), steps=steps)
        launched: list[InFlight] = []
        started = time.perf_counter()

        def launch(work: list[Request], _finished: Finished, _outputs: Outputs) -> None:
            chosen = []  # each step's tokens, (b,) on the device
            inputs = self._decode_inputs(work)
            for _ in range(steps):
                inputs = self._choose(work, self._decode_logits(work, inputs)[:, :self.tokenizer.vocab_size])
                chosen.append(inputs)
            tokens = chosen[0][None] if steps == 1 else torch.stack(chosen)  # (k, b)
            launched.append(InFlight(output, work, tokens, record, started))

        self._guarded(record, requests, finished, outputs, launch, requests, log_step=False)
        return launched[0] if launched else None

    def _decode_inputs(self, requests: list[Request]) -> torch.Tensor | list[int]:
        """Each request's last token: from the step in flight where it has one there (still on the device), else
        from its books."""
        flying = self._in_flight
        if flying is None:
            return [r.output_ids[-1] for r in requests]
        last = flying.tokens[-1]  # (b',) the last step's
        if flying.requests == requests:
            return last
        rows = {r: i for i, r in enumerate(flying.requests)}
        device = last.device
        inputs = to_device([0 if r in rows else r.output_ids[-1] for r in requests], device)  # (b,)
        taken = [(i, rows[r]) for i, r in enumerate(requests) if r in rows]
        if taken:
            into, source = zip(*taken)
            inputs[to_device(into, device)] = last[to_device(source, device)]
        return inputs

    def _land(self, flying: InFlight) -> tuple[Finished, Outputs]:
        """Takes the tokens of launched decode steps, step by step: the finish rules and outputs of their requests
        that were not finished meanwhile (those whose previous step finished them, or aborted); a request that one
        of the steps finishes takes none of the later steps' tokens."""
        finished: Finished = {}
        outputs: Outputs = {}
        rows = [i for i, r in enumerate(flying.requests) if not r.status.finished]
        live = [flying.requests[i] for i in rows]

        def take(_work: list[Request], done: Finished, out: Outputs) -> None:
            for tokens in flying.read():
                going = [i for i in rows if flying.requests[i] not in done]
                if going:
                    self._take([flying.requests[i] for i in going], [tokens[i] for i in going], None, done, out)

        self._guarded(flying.record, live, finished, outputs, take, live, started=flying.started)
        return finished, outputs

    def _drain(self) -> None:
        """On stop: the engine takes no more requests, and every one still queued or running ends with an error."""
        with self._cond:
            self._stopping = True
            left = [ended for request in [*self.scheduler.waiting, *self.scheduler.running]
                    for ended in self.scheduler.finish(request, RequestStatus.FINISHED_ERROR)]
        self._report({r: self._new_output(r, error=self._stop_reason) for r in left})

    def _run(self, output: SchedulerOutput) -> tuple[Finished, Outputs]:
        """Runs one step's model work; returns the requests it finished and every request's new output."""
        finished: Finished = {}
        outputs = {request: self._new_output(request) for request in output.finished}
        now = time.monotonic()
        for request in output.admitted:
            request.admitted_time = now
            seed = request.params.seed
            request.generator = random.Random(secrets.randbits(63) if seed is None else seed % 2**64)
            self.metrics.queue_time.observe(now - request.arrival_time)
        resumed = [r for r in output.admitted if r.resume_row is not None]
        if resumed:  # prompts that continue from a stored prefix's state (`_resume`)
            self.runner.load_prefix([r.resume_row for r in resumed if r.resume_row is not None],
                                    held_slots(resumed))
            for request in resumed:
                request.resume_row = None
        chunks = output.prefill
        if chunks:
            record = StepRecord(output.step, "prefill", tuple(c.request.request_id for c in chunks),
                                sum(c.end - c.start for c in chunks),
                                tuple(c.request.request_id for c in chunks if c.last))
            group = [m for c in chunks for m in c.request.group if not m.status.finished]
            self._guarded(record, group, finished, outputs, self._prefill, chunks)
        if output.decode:
            record = StepRecord(output.step, "decode", tuple(r.request_id for r in output.decode), len(output.decode))
            self._guarded(record, output.decode, finished, outputs, self._decode, output.decode)
        return finished, outputs

    def _guarded(self, record: StepRecord, requests: list[Request], finished: Finished, outputs: Outputs,
                 run: Callable[[Work, Finished, Outputs], None], work: Work, log_step: bool = True,
                 started: float | None = None) -> None:
        """Runs `run(work, finished, outputs)`, timed (from `started`, default now) and logged unless `log_step` is
        false; if the model raises, ends `requests` with an error and keeps serving the others."""
        started = time.perf_counter() if started is None else started
        try:
            with torch.no_grad():
                run(work, finished, outputs)
        except Exception as bad:
            log.exception("engine step %d (%s) failed", record.step, record.kind)
            for request in requests:
                finished[request] = RequestStatus.FINISHED_ERROR
                outputs.setdefault(request, self._new_output(request)).error = f"{type(bad).__name__}: {bad}"
        if log_step:
            elapsed = time.perf_counter() - started
            for _ in range(record.steps):  # decode steps launched together share their time
                self.metrics.step_time.labels(record.kind).observe(elapsed / record.steps)
            self.step_log.append(record)

    def _prefill(self, chunks: list[PrefillChunk], finished: Finished, outputs: Outputs) -> None:
        requests = [c.request for c in chunks]
        slots = held_slots(requests)
        scoring = [row for row, r in enumerate(requests) if r.params.prompt_logprobs is not None]
        # every position's hidden states only for prompts scored; each row's last for its first token
        hidden, last = self.runner.prefill(slots, [c.request.prompt_ids[c.start:c.end] for c in chunks],
                                           [c.start == 0 for c in chunks], [r.scale_bucket for r in requests],
                                           whole=bool(scoring))
        self.metrics.prompt_tokens.inc(sum(c.end - c.start for c in chunks))
        if self.prefixes is not None:
            self._store_prefixes(chunks)
        for row in scoring:
            assert hidden is not None, "kept whole for the prompts scored"
            self._score_prompt(requests[row], chunks[row], hidden[row:row + 1])
        now = time.monotonic()
        sampling: dict[int, list[Request]] = {}  # batch row of a finished prompt → its members that sample now
        for row, chunk in enumerate(chunks):
            if chunk.last and (group := self._prompt_done(chunk.request, now, finished, outputs)):
                sampling[row] = group
        if sampling:  # one batched sampling for them all, each request with its own generator
            logits = self.model.logits(last[list(sampling)])  # (p, V)
            members = torch.tensor([len(group) for group in sampling.values()], device=logits.device)  # (p,)
            self._take_tokens([m for group in sampling.values() for m in group],
                              logits.repeat_interleave(members, dim=0), finished, outputs)  # (t, V)

    def _resume(self, request: Request) -> int:
        """At admission: the prompt tokens a stored prefix state covers (its row noted for `_run` to load), or 0.
        A prompt whose every position is scored (prompt logprobs) or that is decimated prefills whole."""
        assert self.prefixes is not None, "the scheduler asks only with prefix caching on"
        if request.decimates or request.params.prompt_logprobs is not None:
            return 0
        entry = self.prefixes.lookup(request.scale_bucket, request.prompt_ids)
        self.metrics.prefix_cache_queries.inc(len(request.prompt_ids))
        if entry is None:
            return 0
        self.metrics.prefix_cache_hits.inc(len(entry.tokens))
        request.resume_row, request.num_cached = entry.row, len(entry.tokens)
        return len(entry.tokens)

    def _store_prefixes(self, chunks: list[PrefillChunk]) -> None:
        """After a prefill step: each prompt's state at the chunk's end into the prefix cache, in the prompt's
        running row before its end, in a row of its own at its end (server.prefix_cache)."""
        assert self.prefixes is not None, "prefix caching is on"
        slots, rows = [], []
        for chunk in chunks:
            request = chunk.request
            if request.decimates or request.slot is None:
                continue
            owner = None if chunk.last else request.request_id
            row = self.prefixes.place(request.scale_bucket, request.prompt_ids[:chunk.end], owner)
            if chunk.last:
                self.prefixes.release(request.request_id)
            if row is not None:
                slots.append(request.slot)
                rows.append(row)
        if rows:
            self.runner.save_prefix(slots, rows)

    def _prompt_done(self, request: Request, now: float, finished: Finished, outputs: Outputs) -> list[Request]:
        """After the chunk that finished `request`'s prompt: its forks get its state and prompt logprobs.
        Returns the group members that sample a first token now (none when max_tokens is 0: they finish)."""
        assert request.admitted_time is not None and request.slot is not None, "set at admission"
        self.metrics.prefill_time.observe(now - request.admitted_time)
        group = [r for r in request.group if not r.status.finished]  # a fork may have been cancelled
        forks = [r.slot for r in group[1:] if r.slot is not None]
        if forks:  # n samples: one prefill, its state copied into each fork's slot
            self.runner.copy_state(request.slot, forks)
        for member in group:
            out = outputs.setdefault(member, self._new_output(member))
            if request.params.prompt_logprobs is not None:
                member.prompt_logprobs = request.prompt_logprobs
                out.prompt_logprobs = request.prompt_logprobs
        if request.params.max_tokens == 0:
            finished.update((member, RequestStatus.FINISHED_LENGTH) for member in group)
            return []
        return group

    def _score_prompt(self, request: Request, chunk: PrefillChunk, hidden: torch.Tensor) -> None:
        """Logprob of each prompt token given the ones before it, for the positions of this chunk; the first
        prompt token has none (as in OpenAI's echo)."""
        prompt = request.prompt_ids
        if chunk.start == 0:
            request.prompt_logprobs = [None]
        scored = min(chunk.end, len(prompt) - 1) - chunk.start  # positions whose next token is in the prompt
        targets = torch.tensor(prompt[chunk.start + 1:chunk.start + 1 + scored], device=hidden.device)  # (s,)
        top = request.params.prompt_logprobs
        assert top is not None, "scored only when asked"
        for start, logits in self.model.iter_logits(hidden[:, :scored]):  # (1, slice, V)
            request.prompt_logprobs += logprob_entries(logits[0, :, :self.tokenizer.vocab_size],
                                                       targets[start:start + logits.shape[1]], top)

    def _decode(self, requests: list[Request], finished: Finished, outputs: Outputs) -> None:
        self._take_tokens(requests, self._decode_logits(requests, self._decode_inputs(requests)), finished, outputs)

    def _decode_logits(self, requests: list[Request], inputs: torch.Tensor | list[int]) -> torch.Tensor:
        """The batch's decode step on the runner from `inputs`, each request's last token (b,): logits (b, V)."""
        return self.runner.decode(held_slots(requests), inputs, [r.scale_bucket for r in requests])

    def _take_tokens(self, requests: list[Request], logits: torch.Tensor, finished: Finished,
                     outputs: Outputs) -> None:
        """logits: (b, V) of the model. Samples one token per request and applies the finish rules."""
        logits = logits[:, :self.tokenizer.vocab_size]  # (b, V'): ids past the tokenizer are padding
        self._take(requests, self._choose(requests, logits).tolist(), logits, finished, outputs)

    def _choose(self, requests: list[Request], logits: torch.Tensor) -> torch.Tensor:
        """logits: (b, V'). Each request's next token by its own sampling fields and generator, (b,) on the
        device."""
        scores = adjusted(logits, requests, self.tokenizer.eos_token_id)  # (b, V'); logprobs stay the model's
        generators = [g for r in requests if (g := r.generator) is not None]
        assert len(generators) == len(requests), "made at admission"
        return choose(scores, [r.params for r in requests], generators)

    def _take(self, requests: list[Request], tokens: list[int], logits: torch.Tensor | None, finished: Finished,
              outputs: Outputs) -> None:
        """Each request's new token into its books and output, and the finish rules; `logits` (b, V') for the
        requests that want logprobs."""
        now = time.monotonic()
        gaps = []  # inter-token latencies, observed together
        faults = 0
        for i, (request, token) in enumerate(zip(requests, tokens)):
            out = outputs.setdefault(request, self._new_output(request))
            if request.fault is not None:  # its choice was not its own (server.logits_adjustment): it ends here
                log.warning("%s ended with an error: %s", request.request_id, request.fault)
                finished[request], out.error = RequestStatus.FINISHED_ERROR, request.fault
                faults += 1
                continue
            request.output_ids.append(token)
            out.token_ids.append(token)
            if request.params.logprobs is not None:
                assert logits is not None, "a step whose requests want logprobs keeps its logits"
                out.logprobs += logprob_entries(logits[i:i + 1], torch.tensor([token], device=logits.device),
                                                request.params.logprobs)
            if request.first_token_time is None:
                request.first_token_time = now
                self.metrics.time_to_first_token.observe(now - request.arrival_time)
            elif request.last_token_time is not None:  # set with the first token
                gaps.append(now - request.last_token_time)
            request.last_token_time = now
            text, status = take_token(request, token, self.tokenizer.eos_token_id)
            out.text += text
            if status is not None:
                finished[request] = status
        self.metrics.generation_tokens.inc(len(tokens) - faults)
        self.metrics.inter_token_latency.observe_many(gaps)

    def _new_output(self, request: Request, error: str | None = None) -> RequestOutput:
        return RequestOutput(request.request_id, "", [], [], None, request.status, len(request.prompt_ids), 0, error,
                             num_cached_tokens=request.num_cached)

    def _report(self, outputs: dict[Request, RequestOutput]) -> None:
        """Completes each output with the request's status (set by the scheduler) and hands it over."""
        now = time.monotonic()
        for request, out in outputs.items():
            out.status = request.status
            out.num_output_tokens = len(request.output_ids)
            if request.status.finished:
                out.text += request.text.finish()
                out.stop_reason = request.stop_reason
                self.metrics.e2e_latency.observe(now - request.arrival_time)
                self.metrics.requests.labels(FINISH_REASON[request.status]).inc()
                self.metrics.scale_buckets.labels(request.scale_bucket).inc()
            try:
                request.sink(out)
            except Exception:  # a sink belongs to one client; its fault must not stop the engine
                log.exception("output sink of %s failed", request.request_id)
        if outputs:
            self.handed_over()


def held_slots(requests: list[Request]) -> list[int]:
    """The state slots of scheduled requests (every one holds a slot from admission to finish)."""
    slots = [r.slot for r in requests if r.slot is not None]
    assert len(slots) == len(requests), "a scheduled request holds a slot"
    return slots
