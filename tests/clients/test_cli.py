"""`python -m clients` in a subprocess against a live server: what `complete` prints (streamed or not, text or
JSON, with a bucket), its exit status on a bad request, and the percentiles `bench` reports."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

PROMPT = "the river ran past the old mill"


def run_cli(live, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clients", *args, "--base-url", live.url], capture_output=True,
                          text=True, timeout=timeout, cwd=Path(__file__).resolve().parents[2])


def server_completion(live, **body) -> dict:
    response = httpx.post(f"{live.url}/v1/completions", json={"prompt": PROMPT, "temperature": 0, **body}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompt.txt"
    path.write_text(PROMPT, encoding="utf-8")
    return path


@pytest.mark.parametrize("stream", [False, True])
def test_complete_prints_the_servers_greedy_text(live, prompt_file, stream):
    expected = server_completion(live, max_tokens=12)
    done = run_cli(live, "complete", "--prompt-file", str(prompt_file), "--max-tokens", "12", "--temperature", "0",
                   *(["--stream"] if stream else []))
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected["choices"][0]["text"] + "\n"
    usage = expected["usage"]
    assert f"[scale bucket none, {usage['prompt_tokens']} prompt + 12 completion tokens]" in done.stderr


def test_complete_stream_prints_tokens_before_the_completion_ends(live, prompt_file):
    """The first text reaches stdout while the server is still generating (3,000 tokens take seconds here)."""
    cli = subprocess.Popen([sys.executable, "-m", "clients", "complete", "--prompt-file", str(prompt_file),
                            "--max-tokens", "3000", "--temperature", "0", "--stream", "--base-url", live.url],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = os.read(cli.stdout.fileno(), 1)
        still_generating = live.engine.free_slots < live.engine.config.slots
        rest, _ = cli.communicate(timeout=120)
    finally:
        cli.kill()
    assert first and still_generating
    assert cli.returncode == 0 and len(first + rest) > 3000 // 4
    live.wait_idle()


def test_complete_json_is_the_completion_object(live, prompt_file):
    expected = server_completion(live, max_tokens=6)
    done = run_cli(live, "complete", "--prompt-file", str(prompt_file), "--max-tokens", "6", "--temperature", "0",
                   "--json")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["choices"] == expected["choices"] and body["usage"] == expected["usage"]
    assert body["model"] == "tiny" and body["scale_bucket"] == "none" and body["scale_method"] is None


def test_complete_stream_json_is_one_chunk_per_line_then_usage(live, prompt_file):
    expected = server_completion(live, max_tokens=6)
    done = run_cli(live, "complete", "--prompt-file", str(prompt_file), "--max-tokens", "6", "--temperature", "0",
                   "--stream", "--json")
    assert done.returncode == 0, done.stderr
    *chunks, usage = [json.loads(line) for line in done.stdout.splitlines()]
    assert 1 <= len(chunks) <= 6 and len({c["id"] for c in chunks}) == 1  # tokens that waited come in one chunk
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected["choices"][0]["text"]
    assert usage["choices"] == [] and usage["usage"] == expected["usage"]


def test_complete_bucket_chooses_the_scale_set(live, prompt_file):
    expected = server_completion(live, max_tokens=6, scale_bucket="128")
    done = run_cli(live, "complete", "--prompt-file", str(prompt_file), "--max-tokens", "6", "--temperature", "0",
                   "--bucket", "128", "--json")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["scale_bucket"] == "128" and body["scale_method"] == "delta"
    assert body["choices"][0]["text"] == expected["choices"][0]["text"]
    assert body["choices"][0]["text"] != server_completion(live, max_tokens=6)["choices"][0]["text"]


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "error: 400 invalid_request_error: temperature: Input should be greater than or equal "
                              "to 0 [param: temperature]"),
    (["--bucket", "9k"], "error: 400 invalid_request_error (unknown_scale_bucket)"),
])
def test_complete_bad_request_exits_1_with_the_servers_error(live, prompt_file, flags, message):
    done = run_cli(live, "complete", "--prompt-file", str(prompt_file), *flags)
    assert done.returncode == 1 and done.stdout == ""
    assert message in done.stderr


def test_bench_reports_latency_percentiles_and_throughput(live):
    done = run_cli(live, "bench", "--concurrency", "2", "--prompt-tokens", "40", "--requests", "4", "--max-tokens", "5",
                   "--temperature", "0")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert re.search(r"^requests +4 of 4 succeeded \(none failed\) in [\d.]+ s, concurrency 2$", out, re.M), out
    assert re.search(r"^latency \(ms\) +p50 +p90 +p99$", out, re.M), out
    for row in ("time to first", "inter-token", "end to end"):
        p50, p90, p99 = map(float, re.search(rf"^{row} +([\d.]+) +([\d.]+) +([\d.]+)$", out, re.M).groups())
        assert 0 < p50 <= p90 <= p99, out
    prompt = float(re.search(r"^prompt +([\d.]+) tokens per request \(asked for 40", out, re.M).group(1))
    assert abs(prompt - 40) <= 2
    assert re.search(r"^throughput +[1-9][\d.]* output tokens/s", out, re.M), out
    assert "4/4" in done.stderr  # the progress bar


def test_bench_json_counts_every_token(live):
    done = run_cli(live, "bench", "--concurrency", "3", "--prompt-tokens", "30", "--requests", "3", "--max-tokens", "4",
                   "--temperature", "0", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["requests"] == 3 and report["failed"] == {}
    assert 0 < report["completion_tokens"] <= 12 and abs(report["mean_prompt_tokens"] - 30) <= 2
    assert report["output_tokens_per_s"] == pytest.approx(report["completion_tokens"] / report["duration_s"])
    assert set(report["latency_ms"]) == {"ttft", "itl", "e2e"}
    assert all(set(v) == {"p50", "p90", "p99"} for v in report["latency_ms"].values())


def test_bench_with_failing_requests_reports_them_and_exits_1(live):
    done = run_cli(live, "bench", "--concurrency", "2", "--prompt-tokens", "20", "--requests", "2", "--max-tokens", "3",
                   "--bucket", "9k", "--json")
    assert done.returncode == 1
    report = json.loads(done.stdout, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert report["failed"] == {"400 invalid_request_error": 2} and report["completion_tokens"] == 0
    assert report["latency_ms"]["ttft"] == {"p50": None, "p90": None, "p99": None}
