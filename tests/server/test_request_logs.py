"""The log lines per request and vLLM's flags for them: the server's lines per completion request, off unless
`--enable-log-requests` (vLLM's default since it replaced `--disable-log-requests`, which is still taken), and
uvicorn's access log, on unless `--disable-uvicorn-access-log`."""

import logging
import re

import httpx
import pytest
from server_helpers import SERVER_FLAGS, LiveServer

from server.config import ConfigError, parse_args


def _completion_lines(url: str, caplog) -> list[str]:
    """The server's log lines of one completion request whose client named it trace-42."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="server"):
        httpx.post(f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": 2},
                   headers={"X-Request-Id": "trace-42"}, timeout=60).raise_for_status()
    return [r.getMessage() for r in caplog.records if "cmpl-trace-42" in r.getMessage()]


def test_by_default_uvicorn_logs_each_request_and_the_server_no_completion(live, caplog):
    assert live._server.config.access_log
    assert _completion_lines(live.url, caplog) == []


def test_the_flags_turn_the_completion_lines_on_and_the_access_log_off(model_dirs, caplog):
    flags = ["--model", str(model_dirs["mamba1"]), *SERVER_FLAGS]
    with LiveServer([*flags, "--enable-log-requests", "--disable-uvicorn-access-log"]) as server:
        assert not server._server.config.access_log
        submitted, finished = _completion_lines(server.url, caplog)
    assert submitted == "cmpl-trace-42: 1 prompt(s), n=1, max_tokens 2"
    assert re.fullmatch(r"cmpl-trace-42 finished: length, \d+ prompt and 2 generated tokens", finished)
    assert not parse_args([*flags, "--disable-log-requests"])[0].http.log_requests  # vLLM's former flag
    with pytest.raises(ConfigError, match="contradict"):
        parse_args([*flags, "--enable-log-requests", "--disable-log-requests"])
