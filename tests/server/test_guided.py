"""Structured output over real HTTP: guided_choice and guided_regex on the tiny model (whose 96-token vocabulary
spells digits and lower case), JSON schemas and any JSON object on the embedded model (a full byte-level
vocabulary), each completion checked against its constraint, also as vLLM's structured_outputs asks for them; bad
constraints refused with their field's name."""

import json
import re
import sys
import threading
import time

import httpx
import openai
import pytest

from runtime.tokenizer import Tokenizer
from server.config import DEFAULT_MODEL_DIR
from server.errors import InvalidRequestError
from server.guided import Guide, Guides, _xgrammar

from server_helpers import LiveServer

pytest.importorskip("xgrammar")
PROMPT = "the river ran past the old mill"
CHOICES = ["the mill", "a boat", "four"]


def complete(client, **body) -> dict:
    response = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_guided_choice_gives_one_of_the_choices(client):
    for sampled in ({"temperature": 0}, {"temperature": 1.0, "seed": 1, "n": 3}, {"temperature": 1.0, "seed": 5}):
        for choice in complete(client, guided_choice=CHOICES, **sampled)["choices"]:
            assert choice["text"] in CHOICES and choice["finish_reason"] == "stop", choice


def test_structured_outputs_as_vllm_asks_for_them_since_its_guided_fields_went(client):
    """vLLM 0.12 replaced guided_choice, guided_regex, … by structured_outputs: {"choice": …}, {"regex": …}, …;
    the same constraints, never ignored."""
    for choice in complete(client, structured_outputs={"choice": CHOICES}, temperature=1.0, seed=3, n=3)["choices"]:
        assert choice["text"] in CHOICES and choice["finish_reason"] == "stop", choice
    pattern = r"[0-9]{3}: (river|mill)"
    text = complete(client, structured_outputs={"regex": pattern}, temperature=0.8, seed=2)["choices"][0]["text"]
    assert re.fullmatch(pattern, text), text


def test_guided_regex_holds_greedy_sampled_and_streamed(client):
    pattern = r"[0-9]{3}: [0-9]{2} (river|mill)"
    texts = [complete(client, guided_regex=pattern, temperature=0)["choices"][0]["text"],
             *[c["text"] for c in complete(client, guided_regex=pattern, temperature=1.0, seed=2, n=2)["choices"]]]
    with client.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, "stream": True,
                                                        "guided_regex": pattern, "ignore_eos": True}) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    texts.append("".join(e["choices"][0]["text"] for e in events))
    assert events[-1]["choices"][0]["finish_reason"] == "stop"  # the grammar ended it, ignore_eos or not
    for text in texts:
        assert re.fullmatch(pattern, text), text


@pytest.mark.parametrize("fields, param, match", [
    ({"guided_regex": "(unclosed"}, "guided_regex", "cannot be compiled as a regex: Regex parsing error"),
    ({"guided_json": {"type": "nonsense"}}, "guided_json", 'Unsupported type "nonsense"'),
    ({"guided_grammar": "root ::= "}, "guided_grammar", "cannot be compiled as a grammar"),
    ({"guided_grammar": "🙂" * 10}, "guided_grammar", "cannot be compiled as a grammar: a parse error"),
    ({"guided_choice": []}, "guided_choice", "at least 1 item"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "one constraint a request"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "goes with type 'json_schema'"),
    ({"response_format": {"type": "xml"}}, "response_format", "'text', 'json_object' or 'json_schema'"),
    ({"guided_regex": "a" * 70000}, "guided_regex", "a constraint of 70,000 characters, more than the 65,536"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex", "cannot be compiled as a regex"),
    ({"structured_outputs": {"choice": ["a"], "regex": "b"}}, "structured_outputs.choice", "one constraint a request"),
    ({"structured_outputs": {"choice": ["a"]}, "guided_regex": "b"}, "structured_outputs.choice",
     "one constraint a request"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs",
     "structured_outputs.whitespace_pattern: Extra inputs are not permitted"),
])
def test_bad_constraints_are_refused_by_name(client, fields, param, match):
    response = client.post("/v1/completions", json={"prompt": PROMPT, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and match in error["message"], error


def test_a_grammar_the_vocabulary_cannot_spell_ends_with_an_error(client):
    body = client.post("/v1/completions", json={"prompt": PROMPT, "guided_regex": "[{}]+"}).json()
    assert "no token continues the grammar here" in body["error"]["message"]
    assert complete(client, guided_choice=CHOICES)["choices"][0]["text"] in CHOICES  # and the server goes on


@pytest.mark.parametrize("allowed_only_a", [False, True])
def test_a_grammar_at_a_dead_end_ends_its_own_request_and_no_other(client, live, allowed_only_a):
    """The dead end comes in a decode step that another stream shares: after "a", a character no token spells, or
    a digit where allowed_token_ids allows "a" alone. The other stream goes on as alone."""
    a = client.post("/tokenize", json={"prompt": "a", "add_special_tokens": False}).json()["tokens"]
    dead_end = ({"guided_regex": "a[0-9]+", "allowed_token_ids": a} if allowed_only_a else {"guided_regex": "a[{}]+"})
    body = {"prompt": PROMPT, "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
    alone = complete(client, **body)["choices"][0]["text"]
    with httpx.Client(base_url=live.url, timeout=60) as other:
        with other.stream("POST", "/v1/completions", json={**body, "stream": True}) as running:
            lines = running.iter_lines()
            events = [next(line for line in lines if line.startswith("data: {"))]
            dead = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, **dead_end})
            events += [line for line in lines if line.startswith("data: {")]
    assert dead.status_code == 500 and "no token continues the grammar here" in dead.text, dead.text
    chunks = [json.loads(event[6:]) for event in events]
    assert "error" not in chunks[-1] and chunks[-1]["choices"][0]["finish_reason"] == "length", chunks[-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == alone


@pytest.fixture(scope="module")
def embedded():
    with LiveServer(["--model", str(DEFAULT_MODEL_DIR), "--served-model-name", "embedded"]) as server:
        yield server


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


def _follows_schema(value) -> bool:
    return (set(value) == {"name", "age", "tags"} and isinstance(value["name"], str) and len(value["name"]) <= 12
            and isinstance(value["age"], int) and 0 <= value["age"] <= 120
            and all(t in ("a", "b") for t in value["tags"]) and len(value["tags"]) <= 2)


def test_json_schema_and_json_object_through_the_openai_sdk(embedded):
    sdk = openai.OpenAI(base_url=embedded.url + "/v1", api_key="unused", max_retries=0)
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for seed in (1, 2, 3):
        completion = sdk.completions.create(model="embedded", prompt="A person:", max_tokens=80, temperature=0.9,
                                            seed=seed, extra_body={"response_format": response_format})
        assert completion.choices[0].finish_reason == "stop", completion.choices[0].text
        assert _follows_schema(json.loads(completion.choices[0].text)), completion.choices[0].text
    with httpx.Client(base_url=embedded.url, timeout=60) as client:
        body = client.post("/v1/completions", json={"prompt": "Data:", "max_tokens": 200, "temperature": 0.7,
                                                    "seed": 4, "response_format": {"type": "json_object"}}).json()
        choice = body["choices"][0]
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(choice["text"]), dict)
        else:  # cut by max_tokens: a prefix of an object
            assert choice["text"].startswith("{")
        for constraint in ({"guided_json": SCHEMA}, {"structured_outputs": {"json": SCHEMA}}):
            answer = client.post("/v1/completions", json={"prompt": "A person:", "max_tokens": 80, "seed": 1,
                                                          "temperature": 0.9, **constraint}).json()
            assert _follows_schema(json.loads(answer["choices"][0]["text"])), constraint
        any_object = client.post("/v1/completions", json={
            "prompt": "Data:", "max_tokens": 200, "temperature": 0.7, "seed": 4,
            "structured_outputs": {"json_object": True}}).json()
        assert any_object["choices"][0]["text"] == choice["text"]  # as response_format's json_object, same seed


def test_without_xgrammar_a_constraint_is_refused_saying_what_to_install(live, monkeypatch):
    _xgrammar.cache_clear()
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar now raises ImportError
    try:
        with pytest.raises(InvalidRequestError, match=re.escape("pip install 'mamba-extend-server[guided]'")) as bad:
            Guides(live.components.tokenizer).compile_soon(Guide("regex", "[0-9]", "guided_regex")).result()
        assert bad.value.code == "guided_decoding_unavailable"
    finally:
        _xgrammar.cache_clear()


def test_a_grammar_that_takes_seconds_to_compile_holds_up_no_other_request(embedded):
    """Its engine compiles it while it waits in the queue; meanwhile other requests are answered, each within 3 s
    on a 2-core CPU that the compile shares (the engine process once compiled it before taking any other request:
    10-12 s)."""
    slow = "(a|b)*" * 400  # seconds to compile against the embedded model's 8,192 tokens, on each side
    guided: dict = {}

    def ask() -> None:
        with httpx.Client(base_url=embedded.url, timeout=300) as c:
            # one token: a step of this grammar's masks takes half a second of the engine thread, so its tokens
            # would slow the others' steps too (a cost of such grammars, not of their compile)
            guided["response"] = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "guided_regex": slow})

    thread = threading.Thread(target=ask)
    thread.start()
    latencies = []
    with httpx.Client(base_url=embedded.url, timeout=300) as c:
        while thread.is_alive():
            started = time.monotonic()
            c.post("/v1/completions", json={"prompt": "the river", "max_tokens": 4}).raise_for_status()
            latencies.append(time.monotonic() - started)
    response = guided["response"]
    assert response.status_code == 200 and re.fullmatch("[ab]*", response.json()["choices"][0]["text"]), response.text
    assert len(latencies) > 10 and max(latencies) < 3.0, sorted(latencies)[-3:]


def test_a_constraint_compiling_is_compiled_once_for_every_request_that_asks_for_it():
    guides = Guides(Tokenizer(DEFAULT_MODEL_DIR / "tokenizer.json"))
    slow = Guide("regex", "(a|b)*" * 120, "guided_regex")  # about a second against its 8,192 tokens
    other = Guide("regex", "[0-9]+", "guided_regex")
    first = guides.compile_soon(slow)
    assert guides.compile_soon(slow) is first  # asked again while it compiles: the same compile
    assert guides.compile_soon(other).result() is not None  # another constraint does not wait for it
    assert first.result() is guides.compile_soon(slow).result()  # then the cached grammar
    bad = guides.compile_soon(Guide("regex", "(", "guided_regex"))
    with pytest.raises(InvalidRequestError, match="guided_regex: cannot be compiled"):
        bad.result()
    assert guides.compile_soon(Guide("regex", "(", "guided_regex")) is not bad  # a failure is not kept
