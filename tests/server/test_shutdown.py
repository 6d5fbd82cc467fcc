"""Graceful shutdown. SIGTERM to a real `python -m server` (to its whole process group, as a supervisor sends it,
so its engine process gets it too) with four streams running: new requests get 503, the streams that finish
within the grace end with their last token and [DONE], the others (here cut short by a second SIGTERM) with an
error event and [DONE], and the process exits 0. The grace's time-out on a fake engine."""

import asyncio
import json
import os
import time
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import uvicorn

from server.shutdown import SHUTDOWN_REASON, GracefulServer
from server_helpers import SERVER_FLAGS, free_port, healthy, wait_for

GRACE = 120  # --shutdown-timeout: the 200-token streams finish within it, the 150,000-token ones not


@pytest.mark.slow  # a server process and its grace period
def test_sigterm_lets_running_streams_finish_ends_the_rest_with_an_error_and_exits_0(model_dirs, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "server", "--model", str(model_dirs["mamba1"]), *SERVER_FLAGS,
                                "--max-context", "200000", "--port", str(port), "--shutdown-timeout", str(GRACE)],
                               cwd=Path(__file__).resolve().parents[2], stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        wait_for(lambda: healthy(url), timeout=120, what="the server to start")
        events = {n: [] for n in range(4)}

        def stream(n: int, max_tokens: int) -> None:
            body = {"prompt": "the river", "max_tokens": max_tokens, "temperature": 0, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events[n].append(line[6:])

        streams = [threading.Thread(target=stream, args=(n, 200 if n < 2 else 150000)) for n in range(4)]
        for thread in streams:
            thread.start()
        wait_for(lambda: all(events.values()), what="every stream's first event")
        os.killpg(process.pid, signal.SIGTERM)
        wait_for(lambda: httpx.get(url + "/health").status_code == 503, what="/health to answer 503")
        late = httpx.post(url + "/v1/completions", json={"prompt": "the river", "max_tokens": 2}, timeout=10)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        for thread in streams[:2]:
            thread.join(timeout=60)
        assert not any(events[n][-1] == "[DONE]" for n in (2, 3))  # the long ones still run
        os.killpg(process.pid, signal.SIGTERM)  # a second signal ends the grace now
        for thread in streams[2:]:
            thread.join(timeout=60)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    for n in range(4):
        assert events[n][-1] == "[DONE]", events[n][-3:]
        last = json.loads(events[n][-2])
        if n < 2:  # finished within the grace: its last token, then [DONE]
            assert last["choices"][0]["finish_reason"] in ("length", "stop")
        else:
            assert last["error"]["message"] == SHUTDOWN_REASON
    assert "Traceback" not in (tmp_path / "server.log").read_text()


class BusyEngine:
    """An engine whose requests never finish."""

    busy = True

    def __init__(self):
        self.closed_at = self.stopped_at = self.reason = None

    async def close(self):
        self.closed_at = time.monotonic()

    def stop(self, reason):
        self.stopped_at, self.reason = time.monotonic(), reason


class SilentEngine(BusyEngine):
    """An engine that never answers Close."""

    async def close(self):
        await super().close()
        await asyncio.Event().wait()


@pytest.mark.parametrize("kind", [BusyEngine, SilentEngine])
def test_past_the_shutdown_timeout_the_engine_stops_with_the_reason_and_uvicorn_is_told_to_exit(kind):
    engine = kind()
    server = GracefulServer(uvicorn.Config(app=None), engine, grace=0.3)

    async def shut_down():
        server.shut_down()
        while not server.should_exit:
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(shut_down(), timeout=10))
    assert 0.3 <= engine.stopped_at - engine.closed_at < 5 and engine.reason == SHUTDOWN_REASON
