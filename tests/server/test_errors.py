"""Every bad input gets OpenAI error JSON with a 4xx status while the server keeps serving; auth, a full
queue, timeouts, and a start that fails on a bad model or bank."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

import server.config
from server.__main__ import main

from server_helpers import SERVER_FLAGS, LiveServer, wait_for

GOOD = {"prompt": "the river", "max_tokens": 3, "temperature": 0}


def assert_error(response: httpx.Response, status: int, param=None, match: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    assert error["param"] == param and match in error["message"]
    return error


@pytest.mark.parametrize("body, status, param, match", [
    ({**GOOD, "prompt": 5}, 400, "prompt", ""),
    ({**GOOD, "max_tokens": "5"}, 400, "max_tokens", "integer"),
    ({**GOOD, "temperature": "hot"}, 400, "temperature", "number"),
    ({**GOOD, "stream": "yes"}, 400, "stream", "boolean"),
    ({**GOOD, "stop": 3}, 400, "stop", ""),
    ({**GOOD, "stop": ["x"] * 17}, 400, "stop", "at most 16 stop strings, got 17"),
    ({**GOOD, "stop": ["x", "y" * 257]}, 400, "stop", "at most 256 characters, got one of 257"),
    ({**GOOD, "stop": "y" * 257}, 400, "stop", "at most 256 characters"),
    ({"max_tokens": 3}, 400, "prompt", "Field required"),
    ({**GOOD, "max_tokens": -1}, 400, "max_tokens", "greater than or equal to 0"),
    ({**GOOD, "max_tokens": 10**12}, 400, "max_tokens", "exceeds the context limit of 4096"),
    ({**GOOD, "temperature": -0.5}, 400, "temperature", ""),
    ({**GOOD, "top_p": 0}, 400, "top_p", ""),
    ({**GOOD, "top_p": 1.5}, 400, "top_p", ""),
    ({**GOOD, "top_k": -2}, 400, "top_k", ""),
    ({**GOOD, "logprobs": 100}, 400, "logprobs", ""),
    ({**GOOD, "n": 5}, 400, "n", "n (5) is more than this server's state slots (4, --max-batch-size)"),
    ({**GOOD, "n": 0}, 400, "n", "greater than or equal to 1"),
    ({**GOOD, "model": "gpt-4"}, 404, "model", "'gpt-4' does not exist"),
    ({**GOOD, "scale_bucket": "9k"}, 400, "scale_bucket", "known: 128, 256, 512"),
    ({**GOOD, "prompt": [5, 96]}, 400, "prompt", "token id 96 is outside the vocabulary"),
    ({**GOOD, "prompt": [-1]}, 400, "prompt", "outside the vocabulary"),
    ({**GOOD, "prompt": ""}, 400, "prompt", "empty"),
    ({**GOOD, "prompt": []}, 400, "prompt", "empty"),
    ({**GOOD, "prompt": ["the river", ""]}, 400, "prompt", "empty"),
    ({**GOOD, "prompt": ["the river"] * 65}, 400, "prompt", "65 prompts, more than this server queues at once"),
    ({**GOOD, "prompt": [5] * 5000}, 413, "prompt", "5000 tokens, more than this server's context limit of 4096"),
    ({**GOOD, "stream_options": {"include_usage": 1}}, 400, "stream_options", ""),
    # a field of several forms: the error about the form the body took, at its place in the body
    ({**GOOD, "prompt": [5, "the river"]}, 400, "prompt", "prompt[1]: Input should be a valid integer"),
    ({**GOOD, "stop": ["x", 3]}, 400, "stop", "stop[1]: Input should be a valid string"),
    ({**GOOD, "stream_options": {"include_usage": 1}}, 400, "stream_options", "stream_options.include_usage: "),
])
def test_bad_request_bodies(client, body, status, param, match):
    assert_error(client.post("/v1/completions", json=body), status, param, match)
    assert client.post("/v1/completions", json=GOOD).status_code == 200  # still serving


@pytest.mark.parametrize("content, match", [
    (b'{"prompt": "the river", ', "malformed JSON"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b"[1, 2]", "Input should be an object"),
])
def test_bodies_that_are_not_a_json_object(client, content, match):
    response = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert assert_error(response, 400, None, match)["type"] == "invalid_request_error"


def test_unknown_routes_and_methods_are_json_errors(client):
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/completions"), 405)


def test_single_prompt_in_a_list_is_accepted(client):
    as_text = client.post("/v1/completions", json=GOOD).json()["choices"][0]["text"]
    as_list = client.post("/v1/completions", json={**GOOD, "prompt": ["the river"]}).json()["choices"][0]["text"]
    assert as_list == as_text


@pytest.mark.parametrize("given", ["flag", "environment"])
def test_api_key_guards_v1_but_not_health(model_dirs, monkeypatch, given):
    key = ["--api-key", "s3cret"] if given == "flag" else []
    if given == "environment":  # kept out of the process list
        monkeypatch.setenv("MAMBA_EXTEND_API_KEY", "s3cret")
    with LiveServer(["--model", str(model_dirs["mamba1"]), *key, *SERVER_FLAGS]) as live, \
            httpx.Client(base_url=live.url, timeout=60) as c:
        assert assert_error(c.post("/v1/completions", json=GOOD), 401)["type"] == "authentication_error"
        assert_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert c.post("/v1/completions", json=GOOD, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
        assert assert_error(c.post("/invocations", json=GOOD), 401) and c.get("/ping").status_code == 200


def test_full_queue_answers_429_with_retry_after(model_dirs):
    flags = ["--max-batch-size", "1", "--max-queue", "1", "--max-context", "8192"]
    with LiveServer(["--model", str(model_dirs["mamba1"]), *flags]) as live, \
            httpx.Client(base_url=live.url, timeout=60) as c:
        long = {"prompt": "the river", "max_tokens": 8000, "temperature": 0, "stream": True}
        with c.stream("POST", "/v1/completions", json=long) as running:
            wait_for(lambda: live.engine.free_slots == 0, what="the slot to be taken")
            queued = threading.Thread(target=lambda: c.post("/v1/completions", json=GOOD))
            queued.start()
            wait_for(lambda: live.engine.waiting == 1, what="one queued request")
            response = c.post("/v1/completions", json=GOOD)
            assert assert_error(response, 429)["type"] == "rate_limit_error"
            assert int(response.headers["retry-after"]) >= 1
            next(running.iter_lines())
        queued.join()  # the stream closed: its slot went to the queued request, which finished
        assert c.post("/v1/completions", json=GOOD).status_code == 200


def test_a_request_past_the_timeout_ends_with_an_error(model_dirs):
    flags = ["--request-timeout", "0.3", "--max-context", "100000"]
    with LiveServer(["--model", str(model_dirs["mamba1"]), *flags]) as live, \
            httpx.Client(base_url=live.url, timeout=60) as c:
        long = {"prompt": "the river", "max_tokens": 50000, "temperature": 0}
        assert assert_error(c.post("/v1/completions", json=long), 503)["code"] == "request_timeout"
        with c.stream("POST", "/v1/completions", json={**long, "stream": True}) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout"
        assert c.post("/v1/completions", json=GOOD).status_code == 200


def test_when_the_engine_process_dies_its_streams_end_with_an_error_and_the_server_says_it_is_down(model_dirs):
    with LiveServer(["--model", str(model_dirs["mamba1"]), "--max-context", "100000"]) as live, \
            httpx.Client(base_url=live.url, timeout=60) as c:
        long = {"prompt": "the river", "max_tokens": 50000, "temperature": 0, "stream": True}
        with c.stream("POST", "/v1/completions", json=long) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            os.kill(live.engine.pid, signal.SIGKILL)
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["message"] == "the engine process exited"
        assert assert_error(c.get("/health"), 503)["type"] == "unavailable_error"
        assert assert_error(c.post("/v1/completions", json=GOOD), 503)["message"] == "the engine is not running"


def _bank_with_decimate_layer(model_dirs, tmp_path, layer: int) -> list[str]:
    """Flags serving the tiny Mamba1 with a copy of its bank whose decimate entry names `layer`."""
    bank = shutil.copytree(model_dirs["mamba1"] / "bank", tmp_path / "bank")
    manifest = json.loads((bank / "bank.json").read_text())
    for entry in manifest["entries"]:
        if entry["method"] == "decimate":
            entry["params"]["layer"] = layer
    (bank / "bank.json").write_text(json.dumps(manifest))
    return ["--model", str(model_dirs["mamba1"]), "--bank", str(bank)]


def _model_with_config(model_dirs, tmp_path, **changes) -> Path:
    """A copy of the tiny Mamba1 whose config.json has `changes`."""
    model = shutil.copytree(model_dirs["mamba1"], tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **changes}))
    return model


@pytest.mark.parametrize("flags, match", [
    (lambda d, t: ["--model", str(t / "absent")], "absent"),
    (lambda d, t: ["--model", str(d["mamba1"]), "--bank", str(t)], "bank.json: missing file"),
    (lambda d, t: ["--model", str(d["mamba1"]), "--bank", str(d["mamba2"] / "bank")], "bank is for another model"),
    (lambda d, t: ["--model", str(d["mamba1"]), "--tokenizer", str(t / "none.json")], "missing tokenizer file"),
    (lambda d, t: ["--model", str(d["mamba1"]), "--quantize", "int8"],
     "quantization mismatch: bank calibrated on the unquantised model, this model is int8"),
    (lambda d, t: ["--model", str(_model_with_config(d, t, hidden_size="garbage"))],
     "config.json: field 'hidden_size' must be a positive integer, got 'garbage'"),
    (lambda d, t: _bank_with_decimate_layer(d, t, 7),
     "bank.json: bucket 512: decimation layer 7 does not exist: the model has 3 layers"),
    (lambda d, t: ["--model", str(d["mamba1"]), "--prefill-chunk", "2048", "--max-prefill-tokens", "1024"],
     "--max-prefill-tokens 1024 is below --prefill-chunk 2048"),
])
def test_a_bad_model_or_bank_stops_the_start_with_its_message(model_dirs, tmp_path, capsys, flags, match):
    with pytest.raises(SystemExit) as stopped:
        main(flags(model_dirs, tmp_path))
    assert stopped.value.code == 2
    assert match in capsys.readouterr().err


def test_no_model_and_no_default_model_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(server.config, "DEFAULT_MODEL_DIR", tmp_path / "models" / "default")
    with pytest.raises(SystemExit) as stopped:
        main([])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "embedded default model is missing" in err and str(tmp_path / "models" / "default") in err


def test_python_dash_m_server_exits_2_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "server", "--model", str(tmp_path / "absent")],
                            cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(tmp_path / "absent") in result.stderr
