"""The log lines per request, and vLLM's flags that turn them off: the server's line per completion request
(`--disable-log-requests`) and uvicorn's access log (`--disable-uvicorn-access-log`)."""

import logging

import httpx
import pytest
from server_helpers import SERVER_FLAGS, LiveServer


QUIET = ["--disable-log-requests", "--disable-uvicorn-access-log"]


@pytest.mark.parametrize("flags,logged", [([], True), (QUIET, False)])
def test_a_completion_is_logged_unless_the_flags_say_not(model_dirs, caplog, flags, logged):
    with LiveServer(["--model", str(model_dirs["mamba1"]), *SERVER_FLAGS, *flags]) as live:
        assert live._server.config.access_log is logged
        with caplog.at_level(logging.INFO, logger="server.serving"):
            httpx.post(f"{live.url}/v1/completions", json={"prompt": "hello", "max_tokens": 2},
                       timeout=60).raise_for_status()
    lines = [r.getMessage() for r in caplog.records if r.name == "server.serving"]
    assert any("1 prompt(s), n=1, max_tokens 2" in line for line in lines) is logged
