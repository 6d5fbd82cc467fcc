"""The Python clients against live servers: typed results, async streaming, typed errors (an HTTP error, an
error event mid-stream, a time-out, no server), and a 429 from a full queue retried until it succeeds."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from clients import APIError, AsyncClient, Choice, Client, Completion, RetryPolicy, StreamChunk, Usage
from server_helpers import LiveServer, wait_for

PROMPT = "the river ran past the old mill"


def test_complete_returns_typed_results(live):
    with Client(live.url) as client:
        completion = client.complete(PROMPT, max_tokens=5, temperature=0, scale_bucket="256")
    assert isinstance(completion, Completion) and completion.id.startswith("cmpl-") and completion.model == "tiny"
    [choice] = completion.choices
    assert isinstance(choice, Choice) and choice.index == 0 and choice.finish_reason == "length"
    assert completion.text == choice.text and choice.logprobs is None
    prompt_tokens = len(live.components.tokenizer.encode(PROMPT))
    assert completion.usage == Usage(prompt_tokens, 5, prompt_tokens + 5)
    assert (completion.scale_bucket, completion.scale_method,
            completion.scale_beyond_largest) == ("256", "delta", False)


def test_async_stream_yields_chunks_that_add_up_to_the_completion(live):
    async def run():
        async with AsyncClient(live.url) as client:
            chunks = [c async for c in client.stream(PROMPT, max_tokens=9, temperature=0, include_usage=True)]
            return chunks, await client.complete(PROMPT, max_tokens=9, temperature=0)

    chunks, completion = asyncio.run(run())
    *pieces, usage = chunks
    assert all(isinstance(c, StreamChunk) for c in chunks) and 1 <= len(pieces) <= 9  # waiting tokens come together
    assert "".join(c.text for c in pieces) == completion.text
    assert [c.finish_reason for c in pieces] == [None] * (len(pieces) - 1) + ["length"]
    assert usage.choices == () and usage.usage == completion.usage
    assert {c.scale_bucket for c in chunks} == {"none"}


def test_leaving_a_stream_early_cancels_the_request(live):
    with Client(live.url) as client:
        for _chunk in client.stream(PROMPT, max_tokens=3000, temperature=0):
            break
    live.wait_idle(timeout=10)  # the slot came back long before 3,000 tokens were generated


@pytest.mark.parametrize("params, status, type_, param, code", [
    ({"temperature": -1}, 400, "invalid_request_error", "temperature", None),
    ({"scale_bucket": "9k"}, 400, "invalid_request_error", "scale_bucket", "unknown_scale_bucket"),
    ({"model": "gpt-4"}, 404, "invalid_request_error", "model", "model_not_found"),
])
def test_a_bad_request_raises_a_typed_error_without_retrying(live, caplog, params, status, type_, param, code):
    with Client(live.url) as client, pytest.raises(APIError) as raised:
        client.complete(PROMPT, max_tokens=3, **params)
    error = raised.value
    assert (error.status, error.type, error.param, error.code) == (status, type_, param, code) and error.message

    async def stream():
        async with AsyncClient(live.url) as client:
            return [c async for c in client.stream(PROMPT, max_tokens=3, **params)]

    with pytest.raises(APIError) as raised:
        asyncio.run(stream())
    assert (raised.value.status, raised.value.param) == (status, param)
    assert not [r for r in caplog.records if r.name.startswith("clients")]  # a 4xx is final: no retry


def test_an_api_key_is_sent_as_a_bearer_token(served_model):
    with LiveServer(["--model", str(served_model), "--api-key", "sesame"]) as server:
        with Client(server.url) as client, pytest.raises(APIError) as raised:
            client.complete(PROMPT, max_tokens=2)
        assert (raised.value.status, raised.value.code) == (401, "invalid_api_key")
        with Client(server.url, api_key="sesame") as client:
            # min_tokens: a sampled random model may end on its end-of-text token at once
            assert client.complete(PROMPT, max_tokens=2, min_tokens=2).usage.completion_tokens == 2


def test_an_error_after_the_stream_began_raises_with_no_status(served_model):
    with LiveServer(["--model", str(served_model), "--request-timeout", "0.3", "--max-context", "100000"]) as server, \
            Client(server.url) as client:
        received = []
        with pytest.raises(APIError) as raised:
            for chunk in client.stream(PROMPT, max_tokens=50000, temperature=0):
                received.append(chunk)
    assert received  # tokens came first, then the error event
    assert (raised.value.status, raised.value.type, raised.value.code) == (None, "unavailable_error", "request_timeout")


def test_a_time_out_and_a_missing_server_raise_typed_errors(live):
    with Client(live.url, timeout=0.05) as client, pytest.raises(APIError) as raised:
        client.complete(PROMPT, max_tokens=3000, temperature=0)
    assert raised.value.status is None and raised.value.type == "timeout"
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}") as client, pytest.raises(APIError) as raised:
        client.complete(PROMPT)
    assert raised.value.status is None and raised.value.type == "connection_error"
    live.wait_idle()


def test_a_429_from_a_full_queue_is_retried_after_retry_after_and_succeeds(served_model, caplog):
    """One request runs, one waits, so the queue (--max-queue 1) is full and the client's request gets 429.
    Once the client has logged its retry, the running stream is closed; the waiting request takes the slot
    and finishes, and the client's retry (after the server's Retry-After: 1) is admitted."""
    caplog.set_level(logging.WARNING, logger="clients")
    flags = ["--max-batch-size", "1", "--max-queue", "1", "--max-context", "8192"]
    short = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    with LiveServer(["--model", str(served_model), *flags]) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        expected = http.post("/v1/completions", json=short).json()["choices"][0]["text"]
        results = {}

        def client_call():
            with Client(server.url, retry=RetryPolicy(max_retries=5)) as client:
                results["completion"] = client.complete(**short)

        with http.stream("POST", "/v1/completions", json={**short, "max_tokens": 8000, "stream": True}):
            wait_for(lambda: server.engine.free_slots == 0, what="the slot to be taken")
            queued = threading.Thread(target=lambda: http.post("/v1/completions", json=short))
            queued.start()
            wait_for(lambda: server.engine.waiting == 1, what="one queued request")
            retried = threading.Thread(target=client_call)
            retried.start()
            wait_for(lambda: any("answered 429" in r.getMessage() for r in caplog.records), what="a 429 retry")
        queued.join(timeout=30)
        retried.join(timeout=30)
    retries = [r.getMessage() for r in caplog.records if r.name == "clients.client"]
    assert retries and retries[0].startswith("POST /v1/completions answered 429; retry 1 of 5 in 1.00 s")
    assert results["completion"].text == expected and results["completion"].usage.completion_tokens == 4


@pytest.mark.parametrize("retry, status, headers, expected", [
    (0, 429, {"retry-after": "2"}, 2.0),
    (0, 503, {"retry-after": "0.5"}, 0.5),
    (3, 429, {"retry-after": "Thu, 01 Jan 1970 00:00:00 GMT"}, 0.0),  # a date in the past: at once
    (4, 429, {"retry-after": "1"}, None),  # retries spent
    (0, 400, {}, None),
    (0, 500, {}, None),
    (0, 404, {"retry-after": "1"}, None),
])
def test_retry_policy(retry, status, headers, expected):
    assert RetryPolicy(max_retries=4).delay(retry, status, headers) == expected


def test_backoff_without_retry_after_doubles_up_to_its_cap():
    policy = RetryPolicy(max_retries=10, backoff=0.5, max_backoff=3.0)
    delays = [policy.delay(retry, 503, {}) for retry in range(5)]
    for delay, full in zip(delays, (0.5, 1.0, 2.0, 3.0, 3.0)):
        assert full / 2 <= delay <= full  # jittered by up to half


def test_clients_import_nothing_of_the_server_side():
    """`clients` runs where only httpx and tqdm are installed."""
    code = ("import sys, clients, clients.cli, clients.bench; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'runtime', 'server', 'scale_bank', 'extend', "
            "'torch', 'fastapi', 'pydantic'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.stdout.strip() == "[]"
