"""The scheduler alone, driven with fake model outputs (no model): chunking, round-robin prefill, slots,
queue bound, abort and timeout."""

import subprocess
import sys
from pathlib import Path

import pytest

from runtime import IDENTITY, Decimation, Extension
from server.config import EngineConfig
from server.detokenizer import OutputText
from server.errors import QueueFullError
from server.request import Request, RequestStatus, SamplingParams
from server.scheduler import Scheduler


def make_request(name: str, prompt_len: int, max_tokens: int = 4, timeout: float | None = None,
                 arrival: float = 0.0) -> Request:
    return Request(name, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens), IDENTITY, "none",
                   OutputText(None), lambda output: None, timeout, arrival_time=arrival)


def run_step(scheduler: Scheduler, now: float = 0.0):
    """One step with fake outputs: every decoding request generates a token and finishes at max_tokens."""
    output = scheduler.schedule(now)
    finished = {}
    chunk = output.prefill
    if chunk is not None and chunk.last:
        chunk.request.output_ids.append(0)
    for request in output.decode:
        request.output_ids.append(0)
    for request in ([chunk.request] if chunk is not None and chunk.last else []) + output.decode:
        if len(request.output_ids) >= request.params.max_tokens:
            finished[request] = RequestStatus.FINISHED_LENGTH
    scheduler.update(output, finished)
    return output


def test_prompt_runs_in_chunks_of_at_most_prefill_chunk_tokens():
    scheduler = Scheduler(EngineConfig(max_batch_size=2, prefill_chunk=16))
    request = make_request("a", 40)
    scheduler.add(request)
    chunks = [(out.prefill.start, out.prefill.end) for out in (run_step(scheduler) for _ in range(3))]
    assert chunks == [(0, 16), (16, 32), (32, 40)]
    assert request.status is RequestStatus.DECODING and request.num_computed == 40


def test_without_a_chunk_size_every_prompt_runs_whole():
    """What the engine asks where a continued prefill would leave the kernels (Mamba1 on mamba_ssm)."""
    scheduler = Scheduler(EngineConfig(max_batch_size=2, prefill_chunk=None))
    for name, length in (("long", 5000), ("short", 3)):
        scheduler.add(make_request(name, length))
    chunks = [(out.prefill.request.request_id, out.prefill.start, out.prefill.end)
              for out in (run_step(scheduler) for _ in range(2))]
    assert chunks == [("long", 0, 5000), ("short", 0, 3)]


def test_a_decimated_prompt_is_one_chunk_however_long():
    scheduler = Scheduler(EngineConfig(max_batch_size=2, prefill_chunk=16))
    decimated, plain = make_request("decimated", 40), make_request("plain", 20)
    decimated.extension = Extension(decimation=Decimation(layer=0, l_base=8))  # ranks the whole prompt's positions
    scheduler.add(decimated)
    scheduler.add(plain)
    chunks = [(out.prefill.request.request_id, out.prefill.start, out.prefill.end)
              for out in (run_step(scheduler) for _ in range(3))]
    assert chunks == [("decimated", 0, 40), ("plain", 0, 16), ("plain", 16, 20)]


def test_short_prompt_decodes_before_a_long_prompt_finishes_its_prefill():
    scheduler = Scheduler(EngineConfig(max_batch_size=2, prefill_chunk=8))
    long, short = make_request("long", 80, max_tokens=2), make_request("short", 5, max_tokens=3)
    scheduler.add(long)
    run_step(scheduler)  # long's first chunk
    scheduler.add(short)
    log = []
    while scheduler.has_work():
        out = run_step(scheduler)
        if out.prefill is not None:
            log.append(("prefill", out.prefill.request.request_id, out.prefill.last))
        log += [("decode", r.request_id, False) for r in out.decode]
    first_short_decode = log.index(("decode", "short", False))
    long_last_chunk = log.index(("prefill", "long", True))
    assert first_short_decode < long_last_chunk
    assert short.status is RequestStatus.FINISHED_LENGTH and long.status is RequestStatus.FINISHED_LENGTH


def test_every_decoding_request_steps_together_and_slots_are_bounded():
    scheduler = Scheduler(EngineConfig(max_batch_size=2, prefill_chunk=64))
    requests = [make_request(str(i), 4, max_tokens=50) for i in range(3)]
    for request in requests:
        scheduler.add(request)
    out = run_step(scheduler)
    assert [r.request_id for r in out.admitted] == ["0", "1"]  # two slots: the third waits
    assert requests[2].status is RequestStatus.WAITING and requests[2].slot is None
    run_step(scheduler)
    out = run_step(scheduler)
    assert out.prefill is None and [r.request_id for r in out.decode] == ["0", "1"]
    assert sorted(r.slot for r in requests[:2]) == [0, 1]


def test_queue_full_raises_and_a_finished_request_frees_its_slot():
    scheduler = Scheduler(EngineConfig(max_batch_size=1, max_queue=1, prefill_chunk=64))
    first, second = make_request("1", 4, max_tokens=2), make_request("2", 4, max_tokens=2)
    scheduler.add(first)
    run_step(scheduler)  # first takes the slot
    scheduler.add(second)
    with pytest.raises(QueueFullError):
        scheduler.add(make_request("3", 4))
    run_step(scheduler)  # first decodes its second token and finishes
    assert first.status is RequestStatus.FINISHED_LENGTH and first.slot is None
    out = run_step(scheduler)
    assert out.admitted == [second] and second.slot == 0


def test_abort_and_timeout_finish_requests_wherever_they_are():
    scheduler = Scheduler(EngineConfig(max_batch_size=1, prefill_chunk=4))
    running = make_request("running", 40, timeout=None)
    queued = make_request("queued", 4, timeout=1.0, arrival=0.0)
    scheduler.add(running)
    scheduler.add(queued)
    run_step(scheduler, now=0.0)
    running.abort_requested = True
    out = run_step(scheduler, now=2.0)  # past queued's deadline
    assert {r.request_id: r.status for r in out.finished} == {
        "running": RequestStatus.FINISHED_ABORTED, "queued": RequestStatus.FINISHED_TIMEOUT}
    assert scheduler.free_slots == [0] and not scheduler.has_work()


def with_forks(request: Request, n: int) -> Request:
    """`request` and n - 1 forks (the other samples of its prompt)."""
    request.forks = [make_request(f"{request.request_id}-{j}", len(request.prompt_ids), request.params.max_tokens,
                                  request.timeout, request.arrival_time) for j in range(1, n)]
    return request


def test_a_request_with_forks_waits_for_a_slot_each_and_only_it_prefills():
    scheduler = Scheduler(EngineConfig(max_batch_size=3, prefill_chunk=4))
    single, group = make_request("single", 4, max_tokens=8), with_forks(make_request("group", 6, max_tokens=8), 3)
    scheduler.add(single, group)
    out = run_step(scheduler)
    assert out.admitted == [single] and group.status is RequestStatus.WAITING  # 2 slots left, 3 wanted
    single.abort_requested = True
    out = run_step(scheduler)
    assert out.admitted == group.group and out.prefill.request is group
    assert {m.status for m in group.group} == {RequestStatus.PREFILLING} and len(scheduler.running) == 3
    out = run_step(scheduler)  # the prompt's last chunk: every sample decodes from the next step
    assert out.prefill.last and {m.status for m in group.group} == {RequestStatus.DECODING}
    assert all(m.num_computed == 6 for m in group.group)
    assert run_step(scheduler).decode == group.group


def test_forks_go_on_when_the_request_they_copied_ends_at_its_first_token():
    scheduler = Scheduler(EngineConfig(max_batch_size=3, prefill_chunk=4))
    group = with_forks(make_request("group", 4, max_tokens=1), 3)
    for fork in group.forks:
        fork.params = SamplingParams(max_tokens=3)
    scheduler.add(group)
    run_step(scheduler)  # the whole prompt, and the request's one token
    assert group.status is RequestStatus.FINISHED_LENGTH
    assert [fork.status for fork in group.forks] == [RequestStatus.DECODING] * 2 and len(scheduler.free_slots) == 1


@pytest.mark.parametrize("when", ["waiting", "prefilling"])
def test_a_request_that_ends_before_its_prompt_is_done_ends_its_forks(when):
    scheduler = Scheduler(EngineConfig(max_batch_size=2, prefill_chunk=4))
    blocker = make_request("blocker", 4, max_tokens=100)
    group = with_forks(make_request("group", 40, timeout=1.0), 2)
    scheduler.add(*([blocker] if when == "waiting" else []), group)
    run_step(scheduler, now=0.0)
    out = run_step(scheduler, now=2.0)  # past the group's deadline
    assert set(out.finished) == set(group.group)
    assert {m.status for m in group.group} == {RequestStatus.FINISHED_TIMEOUT} and not scheduler.waiting
    assert len(scheduler.free_slots) == (1 if when == "waiting" else 2)


def test_the_engine_layers_import_no_http_framework():
    """pydantic and fastapi stay at the HTTP boundary."""
    code = ("import sys, server.engine, server.scheduler; "
            "print(sorted(m for m in ('fastapi', 'pydantic', 'starlette', 'sse_starlette') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
