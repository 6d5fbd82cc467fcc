"""A reader that falls behind the engine gets the tokens that waited for it in one chunk per choice, and
loses nothing: real HTTP on the tiny model, the server's event loop held while the engine runs on."""

import concurrent.futures
import json

from server_helpers import wait_for

PROMPT = "the river ran past the old mill"


def events_of(lines) -> list[dict]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def held_stream(client, live, body: dict) -> list[dict]:
    """The events of a streamed completion whose server loop is held, after its first event, until the engine
    has finished the request: everything made in that time waits in the request's mailbox."""
    with client.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                         "stream_options": {"include_usage": True}}) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))
        with live.loop_held():
            wait_for(lambda: not live.engine.busy, what="the engine to finish the request")
        return events_of([first, *lines])


def test_a_stream_that_falls_behind_gets_the_waiting_tokens_in_one_chunk_and_the_same_completion(client, live):
    body = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    whole = client.post("/v1/completions", json=body).json()
    live.wait_idle()
    events = held_stream(client, live, body)
    chunks, usage = events[:-1], events[-1]["usage"]
    tokens = [len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks]
    assert max(tokens) > 1 and len(chunks) < 400  # the tokens made while the loop was held came together
    assert sum(tokens) == usage["completion_tokens"] == whole["usage"]["completion_tokens"] == 400
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    streamed_tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    assert streamed_tokens == whole["choices"][0]["logprobs"]["tokens"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]


def test_each_choice_of_a_held_stream_is_its_own_completion(client, live):
    """n samples: each choice's chunks merge only its own outputs; both end with their finish reason."""
    body = {"prompt": PROMPT, "n": 2, "max_tokens": 200, "temperature": 1.0, "seed": 3, "ignore_eos": True}
    whole = client.post("/v1/completions", json=body).json()
    live.wait_idle()
    events = held_stream(client, live, body)
    texts: dict[int, str] = {}
    finishes: dict[int, list] = {}
    for event in events[:-1]:
        [choice] = event["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        finishes.setdefault(choice["index"], []).append(choice["finish_reason"])
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    assert all(reasons[-1] == "length" and set(reasons[:-1]) <= {None} for reasons in finishes.values())
    assert events[-1]["usage"] == whole["usage"]
    assert whole["usage"]["completion_tokens"] == 400


def test_a_non_streamed_completion_held_while_it_runs_is_the_same_completion(client, live):
    body = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True, "logprobs": 1, "echo": True,
            "scale_bucket": "none"}  # echo with logprobs: the prompt's logprobs come with the first output
    alone = client.post("/v1/completions", json=body).json()
    live.wait_idle()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(client.post, "/v1/completions", json=body)
        wait_for(lambda: live.engine.busy or answer.done(), what="the request to be submitted")
        with live.loop_held():
            wait_for(lambda: not live.engine.busy, what="the engine to finish the request")
        held = answer.result().json()
    assert "choices" in alone and held["choices"] == alone["choices"] and held["usage"] == alone["usage"]
