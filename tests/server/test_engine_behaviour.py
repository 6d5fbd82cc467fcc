"""The engine under concurrent clients, seen from outside (HTTP) and from its own step log and metrics:
chunked prefill interleaves with decode, a client that leaves frees its slot, metrics count what was sent."""

import concurrent.futures
import dataclasses
import json
import math
import threading
from functools import partial

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime import load_model
from runtime.tokenizer import Tokenizer
from server.config import EngineConfig
from server.detokenizer import OutputText
from server.engine import Engine
from server import metrics
from server.metrics import Metrics
from server.request import Request, SamplingParams

from server_helpers import SERVER_FLAGS, LiveServer, wait_for
from tokenizers_for_tests import train_tokenizer


def metric(client, name: str, **labels) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_a_long_prefill_does_not_hold_back_another_requests_tokens(live):
    """The short request's first decode step comes before the long prompt's last prefill chunk."""
    live.wait_idle()
    results = {}

    def post(name, body):
        with httpx.Client(base_url=live.url, timeout=60) as c:
            results[name] = c.post("/v1/completions", json={"temperature": 0, **body}).json()

    # scale_bucket none: "auto" would pick the largest bucket, decimate, whose prompt runs in one piece
    long = threading.Thread(target=post, args=("long", {"prompt": [7] * 3000, "max_tokens": 2, "scale_bucket": "none"}))
    long.start()
    wait_for(lambda: any(r.kind == "prefill" for r in list(live.engine.step_log)[-3:]), what="the long prefill")
    post("short", {"prompt": "the river", "max_tokens": 4})
    long.join()
    log = list(live.engine.step_log)
    long_id, short_id = results["long"]["id"], results["short"]["id"]
    long_chunks = [i for i, r in enumerate(log) if r.kind == "prefill" and long_id in r.request_ids]
    short_decodes = [i for i, r in enumerate(log) if r.kind == "decode" and short_id in r.request_ids]
    # a batch's chunks have one length: the long prompt's share of a step is its tokens over its requests
    shares = [log[i].tokens // len(log[i].request_ids) for i in long_chunks]
    assert log[long_chunks[-1]].prompts_done == (long_id,) and sum(shares) == 3000 and max(shares) <= 16
    assert short_decodes and short_decodes[0] < long_chunks[-1]
    assert results["short"]["usage"]["completion_tokens"] >= 1


def stream_text(url: str, body: dict) -> tuple[str, str]:
    """The completion id and text of one streamed completion."""
    request_id, text = "", ""
    with httpx.Client(base_url=url, timeout=60) as c, \
            c.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                request_id = event["id"]
                text += "".join(choice["text"] for choice in event["choices"])
    return request_id, text


def test_concurrent_streams_prefill_together_and_each_gets_its_text_alone(live):
    """Four streams sent at once, of 3000-token prompts (188 chunks of 16 each), with their own buckets, greedy or
    seeded: their chunks share prefill steps (fewer steps than their chunks one by one), and each stream's text is
    the one it gets alone."""
    live.wait_idle()
    settings = [("none", {"temperature": 0}), ("128", {"temperature": 1.0, "seed": 3}),
                ("256", {"temperature": 0}), ("none", {"temperature": 0.8, "top_p": 0.9, "seed": 4})]
    bodies = [{"prompt": [(11 * i + 5 * k) % 90 + 3 for k in range(3000)], "max_tokens": 8, "ignore_eos": True,
               "scale_bucket": bucket, **sampling} for i, (bucket, sampling) in enumerate(settings)]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(partial(stream_text, live.url), bodies))
    ids = {request_id for request_id, _ in together}
    prefills = [set(r.request_ids) & ids for r in live.engine.step_log if r.kind == "prefill"]
    prefills = [shared for shared in prefills if shared]
    assert len(prefills) < 4 * 188 and max(len(shared) for shared in prefills) == 4
    alone = [stream_text(live.url, body)[1] for body in bodies]
    assert [text for _, text in together] == alone and len(set(alone)) == 4


@pytest.mark.parametrize("streamed", [True, False])
def test_a_client_that_disconnects_is_cancelled_and_frees_its_slot(live, streamed):
    live.wait_idle()
    slots = live.engine.config.slots
    with httpx.Client(base_url=live.url, timeout=60) as c:
        aborted = metric(c, "mamba_server_requests_total", finish_reason="abort")
        body = {"prompt": "the river", "max_tokens": 3000, "temperature": 0, "stream": streamed}
        if streamed:
            with c.stream("POST", "/v1/completions", json=body) as response:
                chunks = 0
                for line in response.iter_lines():
                    chunks += line.startswith("data: ")
                    if chunks == 2:
                        break
                assert live.engine.free_slots == slots - 1
        else:  # the client gives up waiting and closes the connection
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
        wait_for(lambda: live.engine.free_slots == slots, what="the slot to be freed")
        assert metric(c, "mamba_server_requests_total", finish_reason="abort") == aborted + 1


def test_token_counters_move_by_exactly_what_was_sent(live):
    live.wait_idle()
    with httpx.Client(base_url=live.url, timeout=60) as c:
        before = {name: metric(c, name) for name in ("mamba_server_prompt_tokens_total",
                                                    "mamba_server_generation_tokens_total",
                                                    "mamba_server_inter_token_latency_seconds_count")}
        length_before = metric(c, "mamba_server_requests_total", finish_reason="length")
        bucket_before = metric(c, "mamba_server_scale_bucket_requests_total", bucket="128")
        bodies = [c.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                  "scale_bucket": "128"}).json()
                  for prompt, max_tokens in (("the river", 5), ("a long road", 9), ([3] * 40, 0))]
        usages = [body["usage"] for body in bodies]
        live.wait_idle()
        for counter, field in (("mamba_server_prompt_tokens_total", "prompt_tokens"),
                               ("mamba_server_generation_tokens_total", "completion_tokens")):
            assert metric(c, counter) - before[counter] == sum(u[field] for u in usages)
        gaps = sum(max(0, u["completion_tokens"] - 1) for u in usages)  # one between each two tokens of a request
        assert metric(c, "mamba_server_inter_token_latency_seconds_count") == \
            before["mamba_server_inter_token_latency_seconds_count"] + gaps
        assert metric(c, "mamba_server_scale_bucket_requests_total", bucket="128") == bucket_before + 3
        finished_by_length = sum(body["choices"][0]["finish_reason"] == "length" for body in bodies)
        assert metric(c, "mamba_server_requests_total", finish_reason="length") == length_before + finished_by_length
        text = c.get("/metrics").text
        for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                     "request_queue_time_seconds", "request_prefill_time_seconds", "engine_step_seconds"):
            assert f'mamba_server_{name}_bucket{{' in text and 'le="0.0001"' in text
        assert metric(c, "mamba_server_requests_running") == 0 and metric(c, "mamba_server_requests_waiting") == 0
        assert metric(c, "mamba_server_process_resident_memory_bytes") > 0
        assert metric(c, "mamba_server_peak_accelerator_memory_bytes") == 0  # CPU


def test_the_openai_sdk_works_unchanged(live):
    sdk = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    plain = sdk.completions.create(model="tiny", prompt="the river", max_tokens=8, temperature=0,
                                   extra_body={"scale_bucket": "128"})
    assert plain.choices[0].finish_reason in ("length", "stop") and plain.usage.prompt_tokens == 6
    assert plain.model_extra["scale_bucket"] == "128"
    chunks = list(sdk.completions.create(model="tiny", prompt="the river", max_tokens=8, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"scale_bucket": "128"}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    with pytest.raises(openai.NotFoundError):
        sdk.completions.create(model="gpt-4", prompt="the river", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="unknown scale bucket"):
        sdk.completions.create(model="tiny", prompt="the river", max_tokens=2, extra_body={"scale_bucket": "9k"})


def test_a_stream_gets_heartbeat_pings_while_a_long_prompt_runs(model_dirs):
    """A ping every 2 ms: a 3000-token prompt in 16-token chunks (188 forward passes) takes far longer
    than that on any machine, so a ping comes before the first token."""
    with LiveServer(["--model", str(model_dirs["mamba1"]), *SERVER_FLAGS, "--heartbeat", "0.002"]) as server:
        body = {"prompt": [9] * 3000, "max_tokens": 1, "stream": True}
        with httpx.Client(base_url=server.url, timeout=60) as c, \
                c.stream("POST", "/v1/completions", json=body) as response:
            lines = [line for line in response.iter_lines() if line]
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: {"))
    assert any(line.startswith(":") for line in lines[:first_data])  # an SSE comment: clients skip it
    assert lines[-1] == "data: [DONE]"


def _finished(outputs, request_id: str) -> bool:
    return bool(outputs) and outputs[-1].request_id == request_id and outputs[-1].finished


def test_tokens_past_the_tokenizers_vocabulary_are_never_sampled(model_dirs, tmp_path):
    """A 72-id tokenizer on the 96-id model: sampling at temperature 2 stays below 72."""
    loaded = load_model(model_dirs["mamba1"])
    tokenizer = Tokenizer(train_tokenizer(tmp_path / "tokenizer.json", vocab_size=72))
    engine = Engine(loaded.model, tokenizer, EngineConfig(max_batch_size=2), Metrics(loaded.model.device))
    outputs = []
    engine.start()
    try:
        for seed in range(100):
            request = Request(f"r{seed}", tokenizer.encode("the river"),
                              SamplingParams(100, temperature=2.0, seed=seed), "none", OutputText(tokenizer),
                              outputs.append)
            engine.submit(request)
            wait_for(partial(_finished, outputs, request.request_id), what="the request to finish")
            if sum(len(out.token_ids) for out in outputs) >= 200:
                break
    finally:
        engine.stop()
    tokens = [t for out in outputs for t in out.token_ids]
    assert len(tokens) >= 200 and max(tokens) < tokenizer.vocab_size == 72


def test_stopping_the_engine_ends_what_it_holds_with_an_error(model_dirs, live):
    loaded, tokenizer = load_model(model_dirs["mamba1"]), live.components.tokenizer
    engine = Engine(loaded.model, tokenizer, EngineConfig(max_batch_size=1), Metrics(loaded.model.device))
    outputs = []
    requests = [Request(name, [5, 6, 7], SamplingParams(100000, temperature=0.0), "none",
                        OutputText(tokenizer), outputs.append)
                for name in ("running", "queued")]
    engine.start()
    for request in requests:
        engine.submit(request)
    wait_for(lambda: len(outputs) > 2, what="the first tokens")
    engine.stop()
    finals = {out.request_id: out for out in outputs if out.finished}
    assert set(finals) == {"running", "queued"}
    assert all(out.status.value == "error" and out.error == "the engine stopped" for out in finals.values())
    assert engine.status().free_slots == 1 and not engine.alive


def test_every_series_names_the_model_and_the_process_and_peak_memory_are_scraped(live, client):
    """What a Prometheus scrape of /metrics gets, read with Prometheus' text-format parser."""
    client.post("/v1/completions", json={"prompt": "the river", "max_tokens": 2})
    families = list(text_string_to_metric_families(client.get("/metrics").text))
    samples = [s for family in families for s in family.samples]
    assert samples and all(s.labels.get("model_name") == "tiny" for s in samples)
    names = {s.name for s in samples}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "mamba_server_peak_resident_memory_bytes",
            "mamba_server_time_to_first_token_seconds_bucket", "mamba_server_generation_tokens_total"} <= names
    current = metric(client, "mamba_server_process_resident_memory_bytes")
    assert metric(client, "mamba_server_peak_resident_memory_bytes") >= current > 0


def test_the_peak_memory_reported_is_never_below_a_current_size_reported_before_it(monkeypatch):
    """/proc's current size and the kernel's peak are counted apart; the gauges must not contradict each other."""
    memory = metrics.ResidentMemory()
    monkeypatch.setattr(metrics, "resident_memory_bytes", lambda: 5e12)  # above any peak the kernel has counted
    assert memory.current() == 5e12
    monkeypatch.setattr(metrics, "resident_memory_bytes", lambda: 1.0)
    assert memory.peak() == 5e12


def test_prefill_padding_is_on_where_asked_or_on_cuda_and_only_where_the_model_pads_exactly(model_dirs, tmp_path):
    """auto: on CUDA only (on a CPU the pad positions' work is the step's time); a Mamba2 whose Δ has a floor above
    0 never pads, whatever is asked."""
    tokenizer = Tokenizer(train_tokenizer(tmp_path / "tokenizer.json", vocab_size=72))
    for arch in ("mamba1", "mamba2"):
        model = load_model(model_dirs[arch]).model
        for asked, pads in ((None, False), (True, True), (False, False)):
            config = EngineConfig(max_batch_size=2, prefill_padding=asked)
            assert Engine(model, tokenizer, config, Metrics(model.device)).scheduler.pads is pads
    model.config = dataclasses.replace(model.config, dt_limit=(1e-3, math.inf))
    config = EngineConfig(max_batch_size=2, prefill_padding=True)
    assert Engine(model, tokenizer, config, Metrics(model.device)).scheduler.pads is False
