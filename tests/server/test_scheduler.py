"""The scheduler alone, driven with fake model outputs (no model): chunking, round-robin prefill, batches of
equal-length chunks (or padded rows, where the model pads exactly) under the prefill budget, slots, queue bound,
abort and timeout."""

import concurrent.futures
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.tokenizer import Tokenizer
from server.config import DEFAULT_MODEL_DIR, EngineConfig
from server.detokenizer import OutputText
from server.errors import QueueFullError
from server.request import Request, RequestStatus, SamplingParams
from server.scheduler import Scheduler


TOKENIZER = Tokenizer(DEFAULT_MODEL_DIR / "tokenizer.json")  # the requests' text is never decoded here


def make_request(name: str, prompt_len: int, max_tokens: int = 4, timeout: float | None = None,
                 arrival: float = 0.0) -> Request:
    return Request(name, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens), "none", OutputText(TOKENIZER),
                   lambda output: None, timeout, arrival_time=arrival)


def config(max_batch_size: int, prefill_chunk: int, max_prefill_tokens: int = 64, **more) -> EngineConfig:
    """A scheduler's settings; the default budget of 64 prompt tokens a step is the engine's to size otherwise."""
    return EngineConfig(max_batch_size=max_batch_size, prefill_chunk=prefill_chunk,
                        max_prefill_tokens=max_prefill_tokens, **more)


def run_step(scheduler: Scheduler, now: float = 0.0):
    """One step with fake outputs: every request whose prompt the step finished and every decoding request
    generates a token, and finishes at max_tokens."""
    output = scheduler.schedule(now)
    finished = {}
    sampled = [chunk.request for chunk in output.prefill if chunk.last] + output.decode
    for request in sampled:
        request.output_ids.append(0)
        if len(request.output_ids) >= request.params.max_tokens:
            finished[request] = RequestStatus.FINISHED_LENGTH
    scheduler.update(output, finished)
    return output


def batch(output) -> list[tuple[str, int, int]]:
    """The step's prefill batch as (request id, start, end) per chunk."""
    return [(chunk.request.request_id, chunk.start, chunk.end) for chunk in output.prefill]


def test_prompt_runs_in_chunks_of_at_most_prefill_chunk_tokens():
    scheduler = Scheduler(config(max_batch_size=2, prefill_chunk=16))
    request = make_request("a", 40)
    scheduler.add(request)
    chunks = [batch(run_step(scheduler)) for _ in range(3)]
    assert chunks == [[("a", 0, 16)], [("a", 16, 32)], [("a", 32, 40)]]
    assert request.status is RequestStatus.DECODING and request.num_computed == 40


def test_a_decimated_prompt_is_one_chunk_however_long():
    scheduler = Scheduler(config(max_batch_size=2, prefill_chunk=16))
    decimated, plain = make_request("decimated", 40), make_request("plain", 20)
    decimated.decimates = True  # its bucket ranks the whole prompt's positions
    scheduler.add(decimated)
    scheduler.add(plain)
    chunks = [batch(run_step(scheduler)) for _ in range(3)]
    assert chunks == [[("decimated", 0, 40)], [("plain", 0, 16)], [("plain", 16, 20)]]


def test_prompts_prefill_together_in_chunks_of_one_length():
    scheduler = Scheduler(config(max_batch_size=4, prefill_chunk=16, max_prefill_tokens=64))
    for name in "abcd":
        scheduler.add(make_request(name, 40))
    steps = [batch(run_step(scheduler)) for _ in range(3)]
    assert steps == [[(name, start, end) for name in "abcd"] for start, end in ((0, 16), (16, 32), (32, 40))]
    assert not scheduler.prefilling and len(scheduler.decoding) == 4


def test_a_batch_stays_within_the_budget_and_the_rest_prefill_next_in_turn():
    scheduler = Scheduler(config(max_batch_size=5, prefill_chunk=16, max_prefill_tokens=48))
    for name in "abcde":
        scheduler.add(make_request(name, 16))
    assert batch(run_step(scheduler)) == [("a", 0, 16), ("b", 0, 16), ("c", 0, 16)]  # 48 tokens
    assert batch(run_step(scheduler)) == [("d", 0, 16), ("e", 0, 16)]


def test_a_request_left_out_of_a_batch_heads_the_next_one():
    """Round-robin turns are kept: b is too short to join a's 16-token chunk, so it fixes the next batch's length,
    in which the others' prompts advance by its 8 tokens."""
    scheduler = Scheduler(config(max_batch_size=3, prefill_chunk=16, max_prefill_tokens=32))
    for name, length in (("a", 40), ("b", 8), ("c", 40)):
        scheduler.add(make_request(name, length))
    steps = [batch(run_step(scheduler)) for _ in range(3)]
    assert steps == [[("a", 0, 16), ("c", 0, 16)],
                     [("b", 0, 8), ("a", 16, 24), ("c", 16, 24)],
                     [("a", 24, 40), ("c", 24, 40)]]


def test_where_rows_pad_a_burst_of_prompts_of_different_lengths_prefills_in_one_step():
    """L is the longest chunk within twice the head's; every shorter prompt of at least half of L joins, padded.
    Without padding the same burst takes a step for each length its rests come to."""
    lengths = {"a": 48, "b": 64, "c": 80, "d": 56, "e": 72}
    scheduler = Scheduler(config(max_batch_size=5, prefill_chunk=128, max_prefill_tokens=512), pads=True)
    for name, length in lengths.items():
        scheduler.add(make_request(name, length))
    assert batch(run_step(scheduler)) == [(name, 0, length) for name, length in lengths.items()]
    assert not scheduler.prefilling and len(scheduler.decoding) == 5
    unpadded = Scheduler(config(max_batch_size=5, prefill_chunk=128, max_prefill_tokens=512))
    for name, length in lengths.items():
        unpadded.add(make_request(name, length))
    steps = 0
    while unpadded.prefilling or unpadded.waiting:
        steps += bool(run_step(unpadded).prefill)
    assert steps == 4


def test_padded_rows_count_against_the_budget_and_a_rest_under_half_of_the_rows_waits():
    scheduler = Scheduler(config(max_batch_size=4, prefill_chunk=64, max_prefill_tokens=100), pads=True)
    for name, length in (("a", 30), ("b", 40), ("c", 10), ("d", 35)):
        scheduler.add(make_request(name, length))
    # L = 40 (within twice a's 30): a and b fill 80 of the 100 tokens, so d waits though 35 ≥ 20; c is under 20
    assert batch(run_step(scheduler)) == [("a", 0, 30), ("b", 0, 40)]
    assert batch(run_step(scheduler)) == [("c", 0, 10), ("d", 0, 10)]  # L = 10: d's 35 is over twice c's
    assert batch(run_step(scheduler)) == [("d", 10, 35)]


def test_a_decimated_prompt_neither_joins_a_batch_nor_heads_one_with_others():
    scheduler = Scheduler(config(max_batch_size=3, prefill_chunk=16, max_prefill_tokens=64))
    plain, decimated, other = make_request("plain", 16), make_request("decimated", 16), make_request("other", 16)
    decimated.decimates = True
    for request in (plain, decimated, other):
        scheduler.add(request)
    assert batch(run_step(scheduler)) == [("plain", 0, 16), ("other", 0, 16)]
    assert batch(run_step(scheduler)) == [("decimated", 0, 16)]
    scheduler = Scheduler(config(max_batch_size=2, prefill_chunk=16, max_prefill_tokens=64))
    for request in (make_request("decimated", 16), make_request("plain", 16)):
        scheduler.add(request)
    scheduler.waiting[0].decimates = True
    assert batch(run_step(scheduler)) == [("decimated", 0, 16)]
    assert batch(run_step(scheduler)) == [("plain", 0, 16)]


def test_short_prompt_decodes_before_a_long_prompt_finishes_its_prefill():
    scheduler = Scheduler(config(max_batch_size=2, prefill_chunk=8))
    long, short = make_request("long", 80, max_tokens=2), make_request("short", 5, max_tokens=3)
    scheduler.add(long)
    run_step(scheduler)  # long's first chunk
    scheduler.add(short)
    log = []
    while scheduler.has_work():
        out = run_step(scheduler)
        log += [("prefill", chunk.request.request_id, chunk.last) for chunk in out.prefill]
        log += [("decode", r.request_id, False) for r in out.decode]
    first_short_decode = log.index(("decode", "short", False))
    long_last_chunk = log.index(("prefill", "long", True))
    assert first_short_decode < long_last_chunk
    assert short.status is RequestStatus.FINISHED_LENGTH and long.status is RequestStatus.FINISHED_LENGTH


def test_every_decoding_request_steps_together_and_slots_are_bounded():
    scheduler = Scheduler(config(max_batch_size=2, prefill_chunk=64))
    requests = [make_request(str(i), 4, max_tokens=50) for i in range(3)]
    for request in requests:
        scheduler.add(request)
    out = run_step(scheduler)
    assert [r.request_id for r in out.admitted] == ["0", "1"]  # two slots: the third waits
    assert requests[2].status is RequestStatus.WAITING and requests[2].slot is None
    run_step(scheduler)
    out = run_step(scheduler)
    assert out.prefill == [] and [r.request_id for r in out.decode] == ["0", "1"]
    assert sorted(r.slot for r in requests[:2]) == [0, 1]


def test_queue_full_raises_and_a_finished_request_frees_its_slot():
    scheduler = Scheduler(config(max_batch_size=1, max_queue=1, prefill_chunk=64))
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
    scheduler = Scheduler(config(max_batch_size=1, prefill_chunk=4))
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
    scheduler = Scheduler(config(max_batch_size=3, prefill_chunk=4))
    single, group = make_request("single", 4, max_tokens=8), with_forks(make_request("group", 6, max_tokens=8), 3)
    scheduler.add(single, group)
    out = run_step(scheduler)
    assert out.admitted == [single] and group.status is RequestStatus.WAITING  # 2 slots left, 3 wanted
    single.abort_requested = True
    out = run_step(scheduler)
    assert out.admitted == group.group and [chunk.request for chunk in out.prefill] == [group]
    assert {m.status for m in group.group} == {RequestStatus.PREFILLING} and len(scheduler.running) == 3
    out = run_step(scheduler)  # the prompt's last chunk: every sample decodes from the next step
    assert out.prefill[0].last and {m.status for m in group.group} == {RequestStatus.DECODING}
    assert all(m.num_computed == 6 for m in group.group)
    assert run_step(scheduler).decode == group.group


def test_a_request_with_forks_prefills_in_a_batch_beside_others_and_its_forks_decode_after():
    scheduler = Scheduler(config(max_batch_size=4, prefill_chunk=4))
    single, group = make_request("single", 6, max_tokens=8), with_forks(make_request("group", 6, max_tokens=8), 3)
    scheduler.add(single, group)
    assert batch(run_step(scheduler)) == [("single", 0, 4), ("group", 0, 4)]  # the forks do not prefill
    assert batch(run_step(scheduler)) == [("single", 4, 6), ("group", 4, 6)]
    assert {m.status for m in [single, *group.group]} == {RequestStatus.DECODING}
    assert run_step(scheduler).decode == [single, *group.group]


def test_forks_go_on_when_the_request_they_copied_ends_at_its_first_token():
    scheduler = Scheduler(config(max_batch_size=3, prefill_chunk=4))
    group = with_forks(make_request("group", 4, max_tokens=1), 3)
    for fork in group.forks:
        fork.params = SamplingParams(max_tokens=3)
    scheduler.add(group)
    run_step(scheduler)  # the whole prompt, and the request's one token
    assert group.status is RequestStatus.FINISHED_LENGTH
    assert [fork.status for fork in group.forks] == [RequestStatus.DECODING] * 2 and len(scheduler.free_slots) == 1


@pytest.mark.parametrize("when", ["waiting", "prefilling"])
def test_a_request_that_ends_before_its_prompt_is_done_ends_its_forks(when):
    scheduler = Scheduler(config(max_batch_size=2, prefill_chunk=4))
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


def test_python_dash_m_server_launches_the_engine_before_it_imports_torch():
    """What `python -m server` imports before it launches the engine process (its entry module, the
    configuration, the launcher) leaves torch to the two processes' concurrent imports."""
    code = "import sys, server.__main__; print('torch' in sys.modules, 'fastapi' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False False", result.stderr


def test_a_request_whose_grammar_compiles_lets_later_ones_in_and_keeps_its_place():
    scheduler = Scheduler(config(max_batch_size=2, prefill_chunk=8))
    compiling, later, last = make_request("compiling", 4), make_request("later", 4), make_request("last", 4)
    compiling.grammar = concurrent.futures.Future()  # its grammar's compile, not yet done
    scheduler.add(compiling, later, last)
    assert scheduler.has_step()  # the later ones can be stepped
    output = run_step(scheduler)
    assert [r.request_id for r in output.admitted] == ["later", "last"]
    assert list(scheduler.waiting) == [compiling] and compiling.status is RequestStatus.WAITING
    while scheduler.decoding or scheduler.prefilling:
        run_step(scheduler)
    assert scheduler.has_work() and not scheduler.has_step()  # only the compile to wait for: the engine sleeps
    compiling.grammar.set_result(object())
    assert scheduler.has_step()
    assert [r.request_id for r in run_step(scheduler).admitted] == ["compiling"]
