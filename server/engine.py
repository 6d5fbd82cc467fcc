"""The engine: one thread owns the model and a pool of recurrent states, and runs the scheduler's steps.

Threads: the HTTP side calls `submit` and `abort` (they only touch the scheduler under `_cond`, and raise
QueueFullError at once when the queue is full); the engine thread loops schedule → run the model → update →
hand each request's output to its `sink`. The model runs outside the lock, so submitting never waits on it.

Each request owns one row (slot) of the state pool from admission to finish. A prefill chunk continues the
slot's state; a decode step gathers the decoding rows, steps them as one batch with a per-row scale set
(every request its own bucket), and writes them back. On CUDA that step is a captured graph replayed per
token (runtime.decode_graph); the pool then has one more row, the graphs' scratch row.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, replace

import torch

from runtime import BatchScales, MambaLM, ScaleMethod, ScaleSet, batch_scales
from runtime.decode_graph import DecodeGraphs
from runtime.tokenizer import Tokenizer

from .config import EngineConfig
from .errors import UnavailableError
from .logits_adjustment import adjusted
from .metrics import Metrics
from .request import FINISH_REASON, Request, RequestOutput, RequestStatus
from .sampling import logprob_entries, sample
from .scheduler import PrefillChunk, Scheduler, SchedulerOutput

log = logging.getLogger(__name__)
WARM_UP_TOKENS = 8  # the start-up prefill: enough to run every kernel a prompt runs


@dataclass(frozen=True)
class StepRecord:
    step: int  # engine step index
    kind: str  # "prefill" (one chunk) or "decode" (one token for each request)
    request_ids: tuple[str, ...]
    tokens: int  # prompt tokens in the chunk, or sequences in the decode batch
    last_chunk: bool = False  # prefill only: the chunk ended the prompt


class Engine:
    def __init__(self, model: MambaLM, tokenizer: Tokenizer, config: EngineConfig, metrics: Metrics):
        assert tokenizer.vocab_size <= model.config.vocab_size, "tokenizer larger than the model's vocabulary"
        self.model = model
        self.tokenizer = tokenizer
        if not model.continues_prefill_on_kernels:  # prompts run whole: a continued chunk would be far slower
            log.info("prefill: whole prompts (the %s back-end's %s scan takes no initial state)", model.backend.name,
                     model.config.arch)
            config = replace(config, prefill_chunk=None)
        self.config = config
        self.metrics = metrics
        graphed = config.cuda_graphs and model.device.type == "cuda"
        self.pool = model.new_state(config.max_batch_size + graphed)  # one row per slot (+ the graphs' scratch)
        self.graphs = DecodeGraphs(model, self.pool) if graphed else None
        self.scheduler = Scheduler(config)
        self.step_log: deque[StepRecord] = deque(maxlen=config.step_log_size)
        self._cond = threading.Condition()
        self._stopping = False
        self._stop_reason = "the engine stopped"  # what the requests still held when it stops are told
        self._closed = False  # admission closed (shutting down): submit refuses, the requests held run on
        self._thread: threading.Thread | None = None
        self._decode_scales_key: tuple[Request, ...] | None = None  # the batch the cached BatchScales belong to
        self._decode_scales = None
        # id(ScaleSet) -> (the set, kept so that its id is never reused; its batch-of-one scales)
        self._one_sequence_scales: dict[int, tuple[ScaleSet, BatchScales]] = {}

    def warm_up(self, scale_sets: list[ScaleSet]) -> None:
        """What a first request would otherwise wait for, done before the server takes requests (as vLLM
        captures its graphs at start): a short prefill (kernel loading, the BLAS and convolution libraries'
        set-up) and, on CUDA, the decode graph of every batch size for every combination of scale fields
        that batches of the bank's sets (and identity) make."""
        with torch.no_grad():
            self.model.prefill(torch.zeros(1, WARM_UP_TOKENS, dtype=torch.long, device=self.model.device))
        if self.graphs is None:
            return
        methods = {s.method for s in scale_sets}
        fields = {(False, False)} | {(m is ScaleMethod.DELTA, m is ScaleMethod.A_SPECTRUM) for m in methods}
        if {ScaleMethod.DELTA, ScaleMethod.A_SPECTRUM} <= methods:
            fields.add((True, True))  # a batch with requests of both
        started = time.monotonic()
        self.graphs.capture(sorted(fields))
        log.info("decode graphs captured: %d (batch sizes %s × scale fields %s) in %.1f s", len(self.graphs.graphs),
                 self.graphs.sizes, sorted(fields), time.monotonic() - started)

    # --- the HTTP side -------------------------------------------------------------------------------

    def start(self) -> None:
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

    @property
    def accepting(self) -> bool:
        return self.alive and not self._closed

    @property
    def busy(self) -> bool:
        """Some request is queued or running."""
        with self._cond:
            return self.scheduler.has_work()

    def submit(self, *requests: Request) -> None:
        """Queues all of `requests` (with their forks); raises QueueFullError, queueing none, when the queue
        has no room for all."""
        with self._cond:
            if not self.alive:
                raise UnavailableError("the engine is not running")
            if self._closed:
                raise UnavailableError("the server is shutting down", code="shutting_down")
            self.scheduler.add(*requests)
            self.metrics.waiting.set(len(self.scheduler.waiting))
            self._cond.notify()

    def abort(self, *requests: Request) -> None:
        """Cancels `requests` (no-op for those finished); their slots are freed at the next step."""
        with self._cond:
            for request in requests:
                request.abort_requested = True
            self._cond.notify()

    @property
    def free_slots(self) -> int:
        with self._cond:
            return len(self.scheduler.free_slots)

    # --- the engine thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        # OpenMP's thread count is per OS thread: the engine thread sets its own (see server/__main__.py).
        torch.set_num_threads(self.config.threads or self._default_threads)
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self.scheduler.has_work():
                        self._cond.wait()
                    if self._stopping:
                        break
                    output = self.scheduler.schedule(time.monotonic())
                finished, outputs = self._run(output)
                with self._cond:
                    self.scheduler.update(output, finished)
                    self.metrics.running.set(len(self.scheduler.running))
                    self.metrics.waiting.set(len(self.scheduler.waiting))
                self._report(outputs)
        except Exception:  # a fault outside the model (bookkeeping): nothing after it can be trusted
            log.exception("the engine loop failed; the engine stops")
        finally:
            self._drain()

    def _drain(self) -> None:
        """On stop: the engine takes no more requests, and every one still queued or running ends with an error."""
        with self._cond:
            self._stopping = True
            left = [ended for request in [*self.scheduler.waiting, *self.scheduler.running]
                    for ended in self.scheduler.finish(request, RequestStatus.FINISHED_ERROR)]
        self._report({r: self._new_output(r, error=self._stop_reason) for r in left})

    def _run(self, output: SchedulerOutput) -> tuple[dict[Request, RequestStatus], dict[Request, RequestOutput]]:
        """Runs one step's model work; returns the requests it finished and every request's new output."""
        finished: dict[Request, RequestStatus] = {}
        outputs = {request: self._new_output(request) for request in output.finished}
        now = time.monotonic()
        for request in output.admitted:
            request.admitted_time = now
            request.generator = torch.Generator(self.model.device)
            seed = request.params.seed
            request.generator.manual_seed(secrets.randbits(63) if seed is None else seed % 2**64)
            self.metrics.queue_time.observe(now - request.arrival_time)
        chunk = output.prefill
        if chunk is not None:
            record = StepRecord(output.step, "prefill", (chunk.request.request_id,), chunk.end - chunk.start, chunk.last)
            group = [r for r in chunk.request.group if not r.status.finished]
            self._guarded(record, group, finished, outputs, self._prefill, chunk)
        if output.decode:
            record = StepRecord(output.step, "decode", tuple(r.request_id for r in output.decode), len(output.decode))
            self._guarded(record, output.decode, finished, outputs, self._decode, output.decode)
        return finished, outputs

    def _guarded(self, record: StepRecord, requests: list[Request], finished: dict, outputs: dict, run, work) -> None:
        """Runs `run(work, finished, outputs)`, timed and logged; if the model raises, ends `requests` with an
        error and keeps serving the others."""
        started = time.perf_counter()
        try:
            with torch.no_grad():
                run(work, finished, outputs)
        except Exception as bad:
            log.exception("engine step %d (%s) failed", record.step, record.kind)
            for request in requests:
                finished[request] = RequestStatus.FINISHED_ERROR
                outputs.setdefault(request, self._new_output(request)).error = f"{type(bad).__name__}: {bad}"
        self.metrics.step_time.labels(record.kind).observe(time.perf_counter() - started)
        self.step_log.append(record)

    def _prefill(self, chunk: PrefillChunk, finished: dict, outputs: dict) -> None:
        request = chunk.request
        prompt = request.prompt_ids
        tokens = torch.tensor([prompt[chunk.start:chunk.end]], device=self.model.device)  # (1, c)
        state = None if chunk.start == 0 else self.pool.rows([request.slot])  # None: zeros, a fresh sequence
        scales = self._prefill_scales(request)
        # (1, c, D); decimated: (1, k, D), the kept positions, ending with the prompt's last (one chunk: c = prompt)
        hidden, state = self.model.hidden_states(tokens, state, scales, decimation=request.decimation)
        self.pool.write_rows([request.slot], state)
        self.metrics.prompt_tokens.inc(chunk.end - chunk.start)
        if request.params.prompt_logprobs:
            self._score_prompt(request, chunk, hidden)
        if not chunk.last:
            return
        self.metrics.prefill_time.observe(time.monotonic() - request.admitted_time)
        group = [r for r in request.group if not r.status.finished]  # a fork may have been cancelled
        forks = [r.slot for r in group[1:]]
        if forks:  # n samples: one prefill, its state copied into each fork's slot
            self.pool.write_rows(forks, self.pool.rows([request.slot] * len(forks)))
        for member in group:
            out = outputs.setdefault(member, self._new_output(member))
            if request.params.prompt_logprobs:
                member.prompt_logprobs = request.prompt_logprobs
                out.prompt_logprobs = request.prompt_logprobs
        if request.params.max_tokens == 0:
            finished.update((member, RequestStatus.FINISHED_LENGTH) for member in group)
            return
        logits = self.model.logits(hidden[:, -1])  # (1, V)
        self._take_tokens(group, logits.expand(len(group), -1), finished, outputs)

    def _prefill_scales(self, request: Request) -> BatchScales | None:
        """A prefill's scales, made once per bank entry (the bank's ScaleSets live as long as the server): the
        scan's folded per-layer constants are then computed once, not per chunk."""
        if request.scales is None:
            return None
        key = id(request.scales)
        if key not in self._one_sequence_scales:
            scales = batch_scales([request.scales], self.model.config, self.model.device)
            self._one_sequence_scales[key] = (request.scales, scales)
        return self._one_sequence_scales[key][1]

    def _score_prompt(self, request: Request, chunk: PrefillChunk, hidden: torch.Tensor) -> None:
        """Logprob of each prompt token given the ones before it, for the positions of this chunk; the first
        prompt token has none (as in OpenAI's echo)."""
        prompt = request.prompt_ids
        if chunk.start == 0:
            request.prompt_logprobs = [None]
        scored = min(chunk.end, len(prompt) - 1) - chunk.start  # positions whose next token is in the prompt
        targets = torch.tensor(prompt[chunk.start + 1:chunk.start + 1 + scored], device=hidden.device)  # (s,)
        for start, logits in self.model.iter_logits(hidden[:, :scored]):  # (1, slice, V)
            request.prompt_logprobs += logprob_entries(logits[0, :, :self.tokenizer.vocab_size],
                                                       targets[start:start + logits.shape[1]], request.params.logprobs)

    def _decode(self, requests: list[Request], finished: dict, outputs: dict) -> None:
        slots = torch.tensor([r.slot for r in requests], device=self.model.device)  # (b,)
        tokens = torch.tensor([r.output_ids[-1] for r in requests], device=self.model.device)  # (b,)
        key = tuple(requests)  # the requests themselves: ids given by clients (X-Request-Id) may repeat
        if key != self._decode_scales_key:
            self._decode_scales_key = key
            self._decode_scales = batch_scales([r.scales for r in requests], self.model.config, self.model.device)
        if self.graphs is not None:
            logits = self.graphs.step(tokens, slots, self._decode_scales)  # (b, V)
        else:
            logits = self.model.step(tokens, self.pool, self._decode_scales, slots)  # (b, V), the pool's rows advanced
        self._take_tokens(requests, logits, finished, outputs)

    def _take_tokens(self, requests: list[Request], logits: torch.Tensor, finished: dict, outputs: dict) -> None:
        """logits: (b, V) of the model. Samples one token per request and applies every finish rule."""
        logits = logits[:, :self.tokenizer.vocab_size]  # (b, V'): ids past the tokenizer are padding
        scores = adjusted(logits, requests, self.tokenizer.eos_token_id)  # (b, V'); logprobs stay the model's
        tokens = sample(scores, [r.params for r in requests], [r.generator for r in requests])
        now = time.monotonic()
        self.metrics.generation_tokens.inc(len(tokens))
        for i, (request, token) in enumerate(zip(requests, tokens)):
            out = outputs.setdefault(request, self._new_output(request))
            request.output_ids.append(token)
            out.token_ids.append(token)
            if request.params.logprobs is not None:
                out.logprobs += logprob_entries(logits[i:i + 1], torch.tensor([token], device=logits.device),
                                                request.params.logprobs)
            if request.first_token_time is None:
                request.first_token_time = now
                self.metrics.time_to_first_token.observe(now - request.arrival_time)
            else:
                self.metrics.inter_token_latency.observe(now - request.last_token_time)
            request.last_token_time = now
            if token == self.tokenizer.eos_token_id and not request.params.ignore_eos:
                finished[request] = RequestStatus.FINISHED_STOPPED
                continue
            if token in request.params.stop_token_ids:
                request.stop_reason = token
                finished[request] = RequestStatus.FINISHED_STOPPED
                continue
            out.text += request.text.push(token)
            if request.text.stopped:
                request.stop_reason = request.text.stop_string
                finished[request] = RequestStatus.FINISHED_STOPPED
            elif len(request.output_ids) >= request.params.max_tokens:
                finished[request] = RequestStatus.FINISHED_LENGTH

    def _new_output(self, request: Request, error: str | None = None) -> RequestOutput:
        return RequestOutput(request.request_id, "", [], [], None, request.status, len(request.prompt_ids), 0, error)

    def _report(self, outputs: dict[Request, RequestOutput]) -> None:
        """Completes each output with the request's status (set by the scheduler) and hands it over."""
        now = time.monotonic()
        for request, out in outputs.items():
            out.status = request.status
            out.num_output_tokens = len(request.output_ids)
            if request.status.finished:
                out.text += request.text.finish()
                out.stop_reason = request.stop_reason
                log.info("%s finished: %s, %d prompt and %d generated tokens", request.request_id,
                         FINISH_REASON[request.status], len(request.prompt_ids), len(request.output_ids))
                self.metrics.e2e_latency.observe(now - request.arrival_time)
                self.metrics.requests.labels(FINISH_REASON[request.status]).inc()
                self.metrics.scale_buckets.labels(request.scale_bucket).inc()
            try:
                request.sink(out)
            except Exception:  # a sink belongs to one client; its fault must not stop the engine
                log.exception("output sink of %s failed", request.request_id)
