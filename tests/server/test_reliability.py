"""The server against hostile but legitimate clients, over real loopback HTTP (raw sockets where a well-behaved
client library would not misbehave): oversized and slow bodies, idle and trickling connections, clients that
leave mid-body or mid-stream by the dozen, extreme sampling parameters. Each case is answered (or the
connection closed) promptly, in OpenAI error JSON, and the server keeps serving."""

import asyncio
import json
import logging
import random
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest

from server.protocol import CompletionRequest
from server_helpers import SERVER_FLAGS, LiveServer, wait_for

MAX_BODY = 65536
TIMEOUT = 0.5  # the guarded server's --body-timeout and --header-timeout
GUARDED_FLAGS = ["--max-body-bytes", str(MAX_BODY), "--body-timeout", str(TIMEOUT), "--header-timeout", str(TIMEOUT)]
GOOD = {"prompt": "the river", "max_tokens": 3, "temperature": 0}


@pytest.fixture(scope="module")
def guarded(model_dirs) -> LiveServer:
    with LiveServer(["--model", str(model_dirs["mamba1"]), *SERVER_FLAGS, *GUARDED_FLAGS]) as server:
        yield server


def connect(server: LiveServer) -> socket.socket:
    url = urlparse(server.url)
    return socket.create_connection((url.hostname, url.port), timeout=10)


def head(length: int | None = None, chunked: bool = False) -> bytes:
    lines = ["POST /v1/completions HTTP/1.1", "Host: test", "Content-Type: application/json"]
    lines += [f"Content-Length: {length}"] if length is not None else []
    lines += ["Transfer-Encoding: chunked"] if chunked else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def response_of(sock: socket.socket) -> tuple[int, dict, bytes]:
    """Status, headers and body of the one response on `sock`, read until the server closes it."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    header_block, _, body = rest.partition(b"\r\n\r\n")
    headers = dict(line.decode().lower().split(": ", 1) for line in header_block.split(b"\r\n"))
    return int(status_line.split()[1]), headers, body


def closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def assert_serving(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/health").status_code == 200
        assert c.post("/v1/completions", json=GOOD).status_code == 200


def error_of(body: bytes) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# --- the bad-input catalogue ---------------------------------------------------------------------------------

def _declared_too_large(sock):
    sock.sendall(head(10**9) + b'{"prompt": "')  # the rest never comes: the answer must not wait for it


def _chunked_too_large(sock):
    sock.sendall(head(chunked=True))
    piece = b"x" * 16384
    for _ in range(MAX_BODY // len(piece) + 1):
        sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))


def _infinite_temperature(sock):
    body = b'{"prompt": "the river", "temperature": 1e999}'  # JSON's overflow parses to Infinity
    sock.sendall(head(len(body)) + body)


@pytest.mark.parametrize("send, status, param, code", [
    (_declared_too_large, 413, None, "request_too_large"),
    (_chunked_too_large, 413, None, "request_too_large"),
    (_infinite_temperature, 400, "temperature", None),
])
def test_bad_input_catalogue(guarded, send, status, param, code):
    with connect(guarded) as sock:
        started = time.monotonic()
        send(sock)
        got, headers, body = response_of(sock)
    assert got == status and time.monotonic() - started < 5
    error = error_of(body)
    assert error["param"] == param and error["code"] == code
    if status == 413:
        assert headers["connection"] == "close" and f"limit of {MAX_BODY}" in error["message"]
    assert_serving(guarded)


@pytest.mark.parametrize("temperature", [1e-40, 1e-300])
def test_a_temperature_just_above_zero_gives_the_greedy_text(client, temperature):
    def text(t):
        body = client.post("/v1/completions", json={"prompt": "the river ran", "max_tokens": 12, "temperature": t})
        return body.json()["choices"][0]["text"]

    assert text(temperature) == text(0)


# Values of every JSON type, edge cases included; small enough that a request they make valid runs in milliseconds.
FUZZ_VALUES = [None, True, False, -1, 0, 1, 2, 16, 10**12, 2**64, -0.5, 0.0, 1e-40, 1e-320, 1e308, 0.5, 1.0, 7.5,
               "", "x", "the river", "é€\u0000", "🙂" * 3, "y" * 300, "none", "auto", "128", "tiny", [], [5, 6], [-1],
               [96], ["the river"], ["x"] * 17, [[5, 6]], [True], {}, {"include_usage": True}, {"include_usage": 1}]


def fuzzed_body(rng: random.Random) -> dict:
    """A valid body with up to two of the described fields (CompletionRequest's JSON schema) set to any of
    FUZZ_VALUES: valid, invalid and borderline requests in about equal measure."""
    body = {"prompt": "the river", "max_tokens": 4, "stream": rng.random() < 0.5}
    for name in rng.sample(sorted(CompletionRequest.model_json_schema()["properties"]), rng.randrange(3)):
        body[name] = rng.choice(FUZZ_VALUES)
    return body


def test_fuzzed_bodies_get_an_answer_or_an_error_json_never_a_5xx(live):
    rng = random.Random(25)
    with httpx.Client(base_url=live.url, timeout=60) as c:
        for _ in range(80):
            body = fuzzed_body(rng)
            with c.stream("POST", "/v1/completions", json=body) as response:
                content = response.read()
            assert response.status_code < 500, (body, content)
            if response.status_code != 200:
                error_of(content)
            elif response.headers["content-type"].startswith("text/event-stream"):
                events = [line[6:] for line in content.decode().splitlines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]" and all("choices" in json.loads(e) for e in events[:-1]), (body, events)
            else:
                assert json.loads(content)["object"] == "text_completion", (body, content)
    assert_serving(live)


# --- slow clients --------------------------------------------------------------------------------------------

def test_a_body_that_arrives_too_slowly_gets_408_and_the_connection_closes(guarded):
    with connect(guarded) as sock:
        sock.sendall(head(100) + b'{"prompt": ')
        started = time.monotonic()
        status, headers, body = response_of(sock)
    assert status == 408 and error_of(body)["code"] == "body_timeout" and headers["connection"] == "close"
    assert TIMEOUT <= time.monotonic() - started < TIMEOUT + 3
    assert_serving(guarded)


def test_idle_and_trickling_connections_are_closed_after_the_header_timeout(guarded):
    idle = [connect(guarded) for _ in range(20)]
    trickling = connect(guarded)
    started = time.monotonic()
    try:
        for byte in head(len(json.dumps(GOOD))):  # a byte every 0.1 s: each would restart uvicorn's keep-alive timer
            trickling.sendall(bytes([byte]))
            time.sleep(0.1)
    except OSError:  # closed by the server mid-head
        pass
    assert all(closed_by_server(sock, within=5) for sock in [*idle, trickling])
    assert time.monotonic() - started < TIMEOUT + 5
    for sock in [*idle, trickling]:
        sock.close()
    assert_serving(guarded)


def test_requests_that_outlast_the_header_timeout_are_not_cut(guarded):
    """The head arrived in time: a stream may run far past --header-timeout, and the connection serves again."""
    with httpx.Client(base_url=guarded.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={**GOOD, "max_tokens": 300, "stream": True}) as response:
            lines = response.iter_lines()
            events = [next(line for line in lines if line.startswith("data: "))]
            time.sleep(TIMEOUT + 0.3)
            events += [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")
        assert c.post("/v1/completions", json=GOOD).status_code == 200


def test_connections_past_the_limit_get_503(model_dirs):
    with LiveServer(["--model", str(model_dirs["mamba1"]), *SERVER_FLAGS, "--max-connections", "2"]) as server:
        held = [connect(server) for _ in range(2)]
        with httpx.Client(base_url=server.url, timeout=60) as c:
            assert c.get("/health").status_code == 503
            for sock in held:
                sock.close()
            wait_for(lambda: c.get("/health").status_code == 200, what="the held connections to be released")


# --- clients that leave ----------------------------------------------------------------------------------------

class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_a_client_that_leaves_mid_body_is_one_log_line_not_a_traceback(guarded):
    uvicorn_errors, ours = Records(), Records()
    logging.getLogger("uvicorn.error").addHandler(uvicorn_errors)
    logging.getLogger("server.body_guard").addHandler(ours)
    logging.getLogger("server.body_guard").setLevel(logging.INFO)
    try:
        with connect(guarded) as sock:
            sock.sendall(head(1000) + b'{"prompt": ')
            time.sleep(0.1)
        wait_for(lambda: ours.messages, what="the log line")
        assert_serving(guarded)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(uvicorn_errors)
        logging.getLogger("server.body_guard").removeHandler(ours)
    assert not [m for m in uvicorn_errors.messages if "Exception in ASGI application" in m]
    [line] = ours.messages
    assert "disconnected before sending the whole request body" in line


def test_a_cancellation_storm_leaves_every_slot_free(live):
    """30 streams opened at once and dropped: some at once, some after their first token."""
    live.wait_idle()

    async def storm():
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as c:
            async def drop(i: int):
                body = {"prompt": "the river", "max_tokens": 3000, "temperature": 1.0, "stream": True}
                async with c.stream("POST", "/v1/completions", json=body) as response:
                    if i % 2:
                        async for line in response.aiter_lines():
                            if line.startswith("data: {"):
                                break

            await asyncio.gather(*(drop(i) for i in range(30)))

    asyncio.run(storm())
    live.wait_idle()
    assert live.engine.free_slots == live.engine.config.slots
    assert_serving(live)


def test_a_long_prompt_is_tokenised_off_the_event_loop(live, monkeypatch):
    """While one prompt is being tokenised (held here until /health has answered), the server answers others."""
    tokenizer = live.components.tokenizer
    entered, release = threading.Event(), threading.Event()

    def held(encode):
        def wrapper(*args, **kwargs):
            entered.set()
            release.wait(timeout=10)
            return encode(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(tokenizer, "encode", held(tokenizer.encode))
    monkeypatch.setattr(tokenizer, "encode_batch", held(tokenizer.encode_batch))
    with httpx.Client(base_url=live.url, timeout=60) as c:
        answer = {}
        posting = threading.Thread(target=lambda: answer.update(r=c.post("/v1/completions", json=GOOD)))
        posting.start()
        try:
            assert entered.wait(timeout=10)
            assert httpx.get(live.url + "/health", timeout=2).status_code == 200
        finally:
            release.set()
            posting.join()
    assert answer["r"].status_code == 200
