"""The log lines per request, and vLLM's flags that turn them off: the server's line per completion request
(`--disable-log-requests`) and uvicorn's access log (`--disable-uvicorn-access-log`)."""

import logging

import httpx
from server_helpers import SERVER_FLAGS, LiveServer

QUIET = ["--disable-log-requests", "--disable-uvicorn-access-log"]


def _logged_a_completion(url: str, caplog) -> bool:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="server.serving"):
        httpx.post(f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": 2}, timeout=60).raise_for_status()
    return any("1 prompt(s), n=1, max_tokens 2" in r.getMessage() for r in caplog.records if r.name == "server.serving")


def test_a_completion_is_logged_by_default(live, caplog):
    assert live._server.config.access_log
    assert _logged_a_completion(live.url, caplog)


def test_the_flags_turn_the_lines_off(model_dirs, caplog):
    with LiveServer(["--model", str(model_dirs["mamba1"]), *SERVER_FLAGS, *QUIET]) as quiet:
        assert not quiet._server.config.access_log
        assert not _logged_a_completion(quiet.url, caplog)
