"""Prefix caching: the bookkeeping of stored prefix states, and over real HTTP on the tiny model (16-token prefill
chunks) that a prompt continuing from a stored state gets the text it gets without the cache, under its own scale
bucket only, and that the metrics count the prompt tokens it skipped."""

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server import schemas
from server.config import ConfigError, parse_args
from server.prefix_affinity import PrefixAffinity
from server.prefix_cache import PrefixCache

from server_helpers import SERVER_FLAGS, LiveServer

DOCUMENT = ("the river ran past the old mill, and the miller's daughter sat on the bank to watch the water go by. "
            "she counted the boats: one, two, three. each boat carried grain to the town.")
QUESTIONS = [" what is the pass key?", " the pass key is 4821. remember it.", " she counted"]


def test_lookup_finds_the_longest_stored_prefix_of_the_same_bucket():
    cache = PrefixCache(3)
    assert cache.place("none", [1, 2, 3]) == 0 and cache.place("none", [1, 2, 3, 4, 5]) == 1
    assert cache.place("8k", [1, 2, 3, 4, 5]) == 2
    assert cache.place("none", [1, 2, 3]) is None  # stored already
    assert cache.lookup("none", [1, 2, 3, 4, 5, 6]).row == 1
    assert cache.lookup("none", [1, 2, 3, 4, 5]).row == 0  # a whole prompt is never skipped: its last token runs
    assert cache.lookup("none", [1, 2, 9, 9]) is None and cache.lookup("4k", [1, 2, 3, 4, 5, 6]) is None


def test_a_running_entry_moves_on_and_the_least_recently_used_goes_first():
    cache = PrefixCache(2)
    assert cache.place("none", [1, 2], owner="a") == 0
    assert cache.place("none", [1, 2, 3, 4], owner="a") == 0  # the same row, the prefix moved on
    assert cache.lookup("none", [1, 2, 9]) is None and cache.lookup("none", [1, 2, 3, 4, 5]).row == 0
    cache.release("a")
    assert cache.place("none", [7, 8]) == 1
    cache.lookup("none", [1, 2, 3, 4, 5])  # row 0 used last: row 1 goes first
    assert cache.place("none", [5, 6], owner="b") == 1 and cache.lookup("none", [7, 8, 9]) is None
    assert cache.place("none", [5, 6, 7], owner="a") == 0  # "a" released: no running entry of its own


def _hits(url: str) -> float:
    exposition = httpx.get(url + "/metrics").text
    return sum(s.value for f in text_string_to_metric_families(exposition) for s in f.samples
               if s.name == "mamba_server_prefix_cache_hits_total")


@pytest.fixture(scope="module")
def cached(model_dirs):
    with LiveServer(["--model", str(model_dirs["mamba1"]), *SERVER_FLAGS, "--enable-prefix-caching"]) as server:
        yield server


def _text(url: str, **body) -> list[str]:
    response = httpx.post(url + "/v1/completions", json={"max_tokens": 12, "temperature": 0, **body}, timeout=60)
    assert response.status_code == 200, response.text
    return [c["text"] for c in response.json()["choices"]]


def test_prompts_on_a_stored_prefix_get_the_text_they_get_without_it(cached, live):
    tokens = len(cached.components.tokenizer.encode(DOCUMENT))
    assert tokens > 48, "the document spans several 16-token chunks"
    for question in QUESTIONS:
        before = _hits(cached.url)
        assert _text(cached.url, prompt=DOCUMENT + question) == _text(live.url, prompt=DOCUMENT + question)
        if question != QUESTIONS[0]:  # the document's chunks were stored by the first
            assert _hits(cached.url) - before >= tokens - 16
    sampled = {"prompt": DOCUMENT + QUESTIONS[0], "temperature": 1.0, "seed": 9, "n": 2}
    assert _text(cached.url, **sampled) == _text(live.url, **sampled)


def test_a_chats_next_turn_continues_from_the_whole_last_prompt(cached, live):
    first = "what is the pass key? the pass key is 4821."
    _text(cached.url, prompt=first)
    before = _hits(cached.url)
    longer = first + " remember it. what is the pass key?"
    body = {"prompt": longer, "max_tokens": 12, "temperature": 0}
    answer, plain = (httpx.post(url + "/v1/completions", json=body).json() for url in (cached.url, live.url))
    assert answer["choices"][0]["text"] == plain["choices"][0]["text"]
    covered = len(cached.components.tokenizer.encode(first))
    assert _hits(cached.url) - before == covered
    assert answer["usage"]["prompt_tokens_details"] == {"cached_tokens": covered}  # OpenAI's field
    assert "prompt_tokens_details" not in plain["usage"]
    schemas.Completion.model_validate(answer)


def test_a_prefix_is_reused_only_under_its_own_scale_bucket(cached, live):
    prompt = DOCUMENT + " the river"
    _text(cached.url, prompt=prompt, scale_bucket="none")
    before = _hits(cached.url)
    assert _text(cached.url, prompt=prompt + " ran", scale_bucket="128") == \
        _text(live.url, prompt=prompt + " ran", scale_bucket="128")
    assert _hits(cached.url) == before  # its states ran with other scales
    echo = {"prompt": prompt + " ran on", "echo": True, "logprobs": 1, "max_tokens": 0}
    scored = httpx.post(cached.url + "/v1/completions", json=echo).json()["choices"][0]["logprobs"]
    assert scored == httpx.post(live.url + "/v1/completions", json=echo).json()["choices"][0]["logprobs"]


def test_the_prefix_cache_flags(model_dirs):
    model = ["--model", str(model_dirs["mamba1"])]
    assert parse_args(model)[0].engine.prefix_cache_slots == 0
    assert parse_args([*model, "--enable-prefix-caching"])[0].engine.prefix_cache_slots is None
    sized, _ = parse_args([*model, "--enable-prefix-caching", "--prefix-cache-slots", "3"])
    assert sized.engine.prefix_cache_slots == 3
    with pytest.raises(ConfigError, match="--enable-prefix-caching, which is off"):
        parse_args([*model, "--prefix-cache-slots", "3"])


def test_prefix_affinity_names_the_engine_of_the_longest_known_prefix():
    affinity = PrefixAffinity(block=2, size=3)
    engine, hashes = affinity.engine("none", [1, 2, 3, 4, 5])
    assert engine is None and len(hashes) == 2  # blocks [1, 2] and [3, 4]: the last token is left to run
    affinity.ran(hashes, 0)
    affinity.ran(affinity.engine("none", [1, 2, 7, 7, 7])[1], 1)  # shares only the first block
    assert affinity.engine("none", [1, 2, 3, 4, 9])[0] == 0 and affinity.engine("none", [1, 2, 8, 8])[0] == 1
    assert affinity.engine("8k", [1, 2, 3, 4, 5])[0] is None  # another bucket's states
    affinity.ran(affinity.engine("none", [5, 5, 5, 5, 5])[1], 1)  # past `size` prefixes: the oldest go
    assert affinity.engine("none", [1, 2, 3, 4, 9])[0] == 1  # [1, 2, 3, 4] forgotten, [1, 2] (engine 1) kept
