"""--data-parallel-size (and vLLM's other serving flags): several engine processes behind one HTTP side, over real
HTTP on the tiny model (two engines on the CPU): requests spread over the engines and come back as one engine
gives them, /metrics labels each engine's series, and an engine that dies takes only its own requests with it."""

import json
import os
import signal
import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.config import ConfigError, engine_ranks, parse_args

from server_helpers import SERVER_FLAGS, LiveServer, wait_for

PROMPTS = ["the river ran past the old mill", "the pass key is 4821. remember it.", "she counted the boats",
           "in the town the baker made bread", "a long context is a long road", "what is the pass key?"]


@pytest.fixture(scope="module")
def pool(model_dirs):
    with LiveServer(["--model", str(model_dirs["mamba1"]), *SERVER_FLAGS, "--data-parallel-size", "2"]) as s:
        yield s


def served(url: str, body: dict) -> dict:
    response = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def concurrently(url: str, bodies: list[dict]) -> list[dict]:
    results: list[dict | None] = [None] * len(bodies)

    def run(i: int) -> None:
        results[i] = served(url, bodies[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results  # type: ignore[return-value]


def requests_by_engine(url: str) -> dict[str, float]:
    exposition = httpx.get(url + "/metrics").text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            assert "engine" in sample.labels, sample  # every series names its engine
            if sample.name == "mamba_server_requests_total":
                counts[sample.labels["engine"]] = counts.get(sample.labels["engine"], 0) + sample.value
    return counts


def test_engines_split_the_requests_and_answer_as_one_engine_does(pool, live):
    assert len(pool.engine.engines) == 2 and len({e.pid for e in pool.engine.engines}) == 2
    bodies = [{"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True} for p in PROMPTS] + \
             [{"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0.9, "seed": 7, "n": 3}]
    alone = [served(live.url, body) for body in bodies]
    together = concurrently(pool.url, bodies)
    assert [[c["text"] for c in r["choices"]] for r in together] == [[c["text"] for c in r["choices"]] for r in alone]
    counts = requests_by_engine(pool.url)
    assert set(counts) == {"0", "1"} and min(counts.values()) >= 2, counts  # both engines served
    assert sum(counts.values()) == len(PROMPTS) + 3  # each choice counted once, by the engine that ran it


def test_a_stream_cancelled_on_one_engine_frees_its_slot_there(pool):
    body = {"prompt": PROMPTS[1], "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", pool.url + "/v1/completions", json=body, timeout=60) as response:
        next(line for line in response.iter_lines() if line.startswith("data: {"))
    pool.wait_idle()


def test_one_engines_death_ends_its_requests_and_the_others_serve_on(model_dirs):
    with LiveServer(["--model", str(model_dirs["mamba1"]), *SERVER_FLAGS, "-dp", "2"]) as server, \
            httpx.Client(base_url=server.url, timeout=60) as c:
        first, second = server.engine.engines
        long = {"prompt": "the river", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/v1/completions", json=long) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            victim = first if first.unfinished else second
            os.kill(victim.pid, signal.SIGKILL)
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert json.loads(events[-2])["error"]["message"] == "the engine process exited"
        assert c.get("/health").status_code == 503  # degraded: an operator restarts it
        for prompt in PROMPTS[:3]:  # the survivor takes every request
            assert c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4}).status_code == 200
        wait_for(lambda: not victim.alive, what="the dead engine's status")


def test_engine_ranks_take_their_own_device_or_share_of_the_cores(model_dirs):
    config, _ = parse_args(["--model", str(model_dirs["mamba1"]), "--device", "cuda:2", "-dp", "3"])
    assert [rank.model.device for rank in engine_ranks(config)] == ["cuda:2", "cuda:3", "cuda:4"]
    config, _ = parse_args(["--model", str(model_dirs["mamba1"]), "-dp", "2"])
    threads = [rank.engine.threads for rank in engine_ranks(config)]
    assert threads == [max(1, len(os.sched_getaffinity(0)) // 2)] * 2
    config, _ = parse_args(["--model", str(model_dirs["mamba1"]), "-dp", "2", "--threads", "3"])
    assert [rank.engine.threads for rank in engine_ranks(config)] == [3, 3]
    with pytest.raises(ConfigError, match="not on mps"):
        parse_args(["--model", str(model_dirs["mamba1"]), "-dp", "2", "--device", "mps"])


def test_vllms_flag_names_are_taken(model_dirs):
    """A vLLM launch line's serving flags mean the same here; tensor parallelism is refused, pointing at -dp."""
    config, _ = parse_args(["--model", str(model_dirs["mamba1"]), "--max-num-seqs", "8", "--max-model-len", "9000",
                            "--max-num-batched-tokens", "4096", "--prefill-chunk", "1024", "-tp", "1"])
    assert (config.engine.max_batch_size, config.http.max_context, config.engine.max_prefill_tokens) == \
        (8, 9000, 4096)
    with pytest.raises(ConfigError, match="--tensor-parallel-size 2: .*--data-parallel-size"):
        parse_args(["--model", str(model_dirs["mamba1"]), "--tensor-parallel-size", "2"])


def _prefix_hits_by_engine(url: str) -> dict[str, float]:
    hits: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name == "mamba_server_prefix_cache_hits_total":
                hits[sample.labels["engine"]] = sample.value
    return hits


def test_a_prompt_goes_to_the_engine_that_holds_its_prefix(model_dirs):
    """With prefix caching, a second question about a document goes to the engine that ran the first (its
    stored states are there), although another engine is idler, and gets the text one engine gives it."""
    document = " ".join(PROMPTS) * 2
    flags = ["--model", str(model_dirs["mamba1"]), *SERVER_FLAGS, "-dp", "2", "--enable-prefix-caching"]
    with LiveServer(flags) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        body = {"max_tokens": 8, "temperature": 0}
        first = c.post("/v1/completions", json={**body, "prompt": document + " what is"}).json()
        long = {"prompt": "the river", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/v1/completions", json=long) as response:  # keeps the first's engine busy
            next(line for line in response.iter_lines() if line.startswith("data: {"))
            [busy] = [i for i, e in enumerate(server.engine.engines) if e.unfinished]
            second = c.post("/v1/completions", json={**body, "prompt": document + " she counted"}).json()
        assert first["choices"][0]["text"]
        hits = _prefix_hits_by_engine(server.url)
        assert hits[str(busy)] >= len(server.components.tokenizer.encode(document)) - 16, (busy, hits)
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
