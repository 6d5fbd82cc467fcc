"""--api-server-count: several HTTP processes on one port and one engine, a real `python -m server` on the tiny
model. Requests reach both processes and come back as one process gives them; SIGTERM to the process group lets
the running streams finish and every process exit 0; an HTTP process that dies takes only its own requests."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from server_helpers import SERVER_FLAGS, free_port, healthy, wait_for

BODY = {"prompt": "the river ran past the old mill", "max_tokens": 12, "temperature": 0, "ignore_eos": True}


@pytest.fixture
def two_processes(model_dirs, tmp_path):
    """The server with --api-server-count 2 in a session of its own: (url, its process, the log's path). Its log has
    a line per completion request (--enable-log-requests), which names the HTTP process that took it."""
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "server", "--model", str(model_dirs["mamba1"]), *SERVER_FLAGS,
                                    "--port", str(port), "--api-server-count", "2", "--threads", "1",
                                    "--enable-log-requests"],
                                   cwd=Path(__file__).resolve().parents[2], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        ready = "[mamba-api-1] server.shutdown: accepting connections"
        wait_for(lambda: healthy(url) and ready in log_path.read_text(), timeout=120,
                 what="both HTTP processes to start")
        yield url, process, log_path
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _stream(url: str, body: dict) -> list[str]:
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def _concurrently(url: str, count: int) -> list[list[str]]:
    results: list[list[str]] = [[] for _ in range(count)]

    def run(i: int) -> None:
        results[i] = _stream(url, BODY)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def _text(events: list[str]) -> str:
    assert events[-1] == "[DONE]", events[-3:]
    return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"])


@pytest.mark.slow  # a server of three processes
def test_both_http_processes_serve_one_engine_and_exit_on_sigterm(two_processes):
    url, process, log_path = two_processes
    alone = httpx.post(url + "/v1/completions", json=BODY, timeout=60).json()["choices"][0]["text"]
    served_by_both = False
    waves = 0
    # the kernel hands each connection to whichever process accepts first: on a loaded machine one process can
    # take a whole wave, so waves follow until both have served (8 waves of one process only would be a fault)
    while not served_by_both and waves < 8:
        streams = _concurrently(url, 24)
        waves += 1
        assert all(_text(events) == alone for events in streams)
        log = log_path.read_text()
        served_by_both = bool(re.search(r"\[mamba-api-1\] server\.serving: cmpl-", log)
                              and re.search(r"^\S+ \S+ INFO server\.serving: cmpl-", log, re.MULTILINE))
    assert served_by_both, f"after {waves} waves of 24 streams, one HTTP process had served every request"
    metrics = httpx.get(url + "/metrics").text  # the engine's books, whichever process asks: every request
    finished = re.search(r'mamba_server_requests_total\{[^}]*finish_reason="length"[^}]*\} (\d+)\.0', metrics)
    assert finished and int(finished.group(1)) == 1 + 24 * waves, metrics[:2000]

    running = threading.Thread(target=lambda: results.append(_stream(url, {**BODY, "max_tokens": 400})))
    results: list[list[str]] = []
    running.start()
    wait_for(lambda: "max_tokens 400" in log_path.read_text(), what="the long stream to start")
    os.killpg(process.pid, signal.SIGTERM)  # as a supervisor signals: every process of the group
    running.join(timeout=120)
    assert process.wait(timeout=60) == 0
    last = json.loads(results[0][-2])
    assert last.get("choices", [{}])[0].get("finish_reason") == "length", (last, log_path.read_text()[-3000:])
    assert "Traceback" not in log_path.read_text()


@pytest.mark.slow
def test_an_http_process_that_dies_takes_only_its_own_requests(two_processes):
    url, process, log_path = two_processes
    follower = int(re.search(r"HTTP process 1 started \(pid (\d+)\)", log_path.read_text()).group(1))
    os.kill(follower, signal.SIGKILL)
    wait_for(lambda: "HTTP process 1 closed its connection" in log_path.read_text(), what="the engine to see it")
    assert healthy(url)
    assert all(_text(events) for events in _concurrently(url, 6))  # every connection now reaches the first
