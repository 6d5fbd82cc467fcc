"""Several prompts in one request, and n samples of a prompt (one prefill whose state is copied into n slots),
over real HTTP on the tiny model: each choice is what a request of its own would give, indexed as OpenAI does."""

import concurrent.futures
import json

import httpx
import openai
import pytest

from server_helpers import wait_for

PROMPTS = ["the river ran past the old mill", "the pass key is 4821", "a long road"]


def post(client, **body) -> dict:
    response = client.post("/v1/completions", json={"max_tokens": 10, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def text_of(client, **body) -> str:
    [choice] = post(client, **body)["choices"]
    return choice["text"]


def streamed_texts(client, **body) -> dict[int, str]:
    texts: dict[int, str] = {}
    with client.stream("POST", "/v1/completions", json={"max_tokens": 10, "temperature": 0, **body,
                                                         "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return texts


def test_several_prompts_give_each_ones_own_completion_in_order(client, live):
    body = post(client, prompt=PROMPTS, stream_options=None)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == [text_of(client, prompt=p) for p in PROMPTS]
    tokenizer = live.components.tokenizer
    prompt_tokens = sum(len(tokenizer.encode(p)) for p in PROMPTS)
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    as_ids = post(client, prompt=[tokenizer.encode(p) for p in PROMPTS])
    assert [c["text"] for c in as_ids["choices"]] == [c["text"] for c in body["choices"]]
    assert streamed_texts(client, prompt=PROMPTS) == {c["index"]: c["text"] for c in body["choices"]}


def test_prompts_of_one_length_prefill_together_and_complete_as_alone(client, live):
    """A request's prompts are submitted at once: prompts of one length (40 tokens: chunks of 16, 16, 8) run in
    the same prefill steps, here all with one bucket's Δ scales, and complete as they do alone."""
    live.wait_idle()
    prompts = [[(7 * i + 3 * k) % 90 + 3 for k in range(40)] for i in range(3)]
    body = post(client, prompt=prompts, scale_bucket="128")
    prefills = [r for r in live.engine.step_log if r.kind == "prefill"
                and any(i.startswith(body["id"]) for i in r.request_ids)]
    assert [(len(r.request_ids), r.tokens) for r in prefills] == [(3, 48), (3, 48), (3, 24)]
    assert [c["text"] for c in body["choices"]] == [text_of(client, prompt=p, scale_bucket="128") for p in prompts]


def test_prompts_of_different_lengths_prefill_in_one_step_and_complete_and_score_as_alone(client, live):
    """Chunks of 16, 12 and 9 tokens share one prefill step, the shorter rows padded (each state left after its
    last real token): the greedy completions, and the echoed prompts' logprobs, are each prompt's alone."""
    live.wait_idle()
    prompts = [[(5 * i + 3 * k) % 90 + 3 for k in range(length)] for i, length in enumerate((16, 12, 9))]
    body = post(client, prompt=prompts, scale_bucket="128")
    prefills = [r for r in live.engine.step_log if r.kind == "prefill"
                and any(i.startswith(body["id"]) for i in r.request_ids)]
    assert [(len(r.request_ids), r.tokens) for r in prefills] == [(3, 37)]
    assert [c["text"] for c in body["choices"]] == [text_of(client, prompt=p, scale_bucket="128") for p in prompts]
    scored = post(client, prompt=prompts, max_tokens=0, echo=True, logprobs=1)
    for choice, prompt in zip(scored["choices"], prompts):
        [single] = post(client, prompt=prompt, max_tokens=0, echo=True, logprobs=1)["choices"]
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(single["logprobs"]["token_logprobs"][1:],
                                                                         rel=1e-5, abs=1e-5)


def test_batched_prompts_score_as_single_ones_each_with_its_own_bucket(client):
    """lm-evaluation-harness batches loglikelihood requests: echo + logprobs + max_tokens 0 over a list. The long
    prompt's chunks share prefill steps with the short one's (a batch of two buckets' scales), so its logprobs
    are the single request's up to float32 rounding."""
    long = " ".join([PROMPTS[0]] * 6)  # past the test bank's training length of 64: bucket "128" under auto
    batch = post(client, prompt=[PROMPTS[1], long], max_tokens=0, echo=True, logprobs=1)
    singles = [post(client, prompt=p, max_tokens=0, echo=True, logprobs=1) for p in (PROMPTS[1], long)]
    for choice, single in zip(batch["choices"], singles):
        got, want = choice["logprobs"], single["choices"][0]["logprobs"]
        assert got["tokens"] == want["tokens"] and got["text_offset"] == want["text_offset"]
        assert got["token_logprobs"][0] is None is want["token_logprobs"][0]  # the first token has none
        assert got["token_logprobs"][1:] == pytest.approx(want["token_logprobs"][1:], rel=1e-5, abs=1e-5)
        assert got["top_logprobs"][1:] == [pytest.approx(top, rel=1e-5, abs=1e-5) for top in want["top_logprobs"][1:]]
        assert choice["scale_bucket"] == single["scale_bucket"]
    assert [c["scale_bucket"] for c in batch["choices"]] == ["none", "128"]
    assert batch["scale_bucket"] is None  # the prompts' buckets differ: each choice names its own


def test_n_samples_are_the_seeded_samples_of_one_prefill(client, live):
    """Sample j of a seeded request is seeded seed + j (as vLLM does), so each equals a request of its own
    with that seed, though the n samples ran one prefill and copied its state."""
    body = post(client, prompt=PROMPTS[0], n=3, temperature=1.0, seed=11, max_tokens=16)
    texts = [c["text"] for c in body["choices"]]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2] and len(set(texts)) == 3
    assert texts == [text_of(client, prompt=PROMPTS[0], temperature=1.0, seed=11 + j, max_tokens=16)
                     for j in range(3)]
    prefills = [r for r in live.engine.step_log if r.kind == "prefill"
                and any(i.startswith(body["id"]) for i in r.request_ids)]
    assert {r.request_ids for r in prefills} == {(body["id"] + "-0",)}  # the first sample's prefill only
    assert body["usage"]["prompt_tokens"] == len(live.components.tokenizer.encode(PROMPTS[0]))


def test_n_with_several_prompts_indexes_prompt_then_sample(client):
    body = post(client, prompt=PROMPTS[:2], n=2, max_tokens=6)
    texts = [c["text"] for c in body["choices"]]
    singles = [text_of(client, prompt=p, max_tokens=6) for p in PROMPTS[:2]]
    assert texts == [singles[0], singles[0], singles[1], singles[1]]  # greedy: the samples agree
    assert streamed_texts(client, prompt=PROMPTS[:2], n=2, max_tokens=6) == dict(enumerate(texts))
    assert post(client, prompt=PROMPTS[0], n=2, best_of=2, max_tokens=2)["choices"][1]["index"] == 1


def test_n_and_best_of_beyond_what_is_served_are_refused(client):
    too_many = client.post("/v1/completions", json={"prompt": "the river", "n": 5})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
    held_back = client.post("/v1/completions", json={"prompt": "the river", "n": 1, "best_of": 3})
    assert held_back.status_code == 400 and held_back.json()["error"]["param"] == "best_of"


def test_a_client_that_leaves_frees_every_samples_slot(live):
    live.wait_idle()  # the earlier tests' slots are back: the count below is this request's alone
    with httpx.Client(base_url=live.url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json={"prompt": PROMPTS[0], "n": 3, "max_tokens": 4000,
                                                             "ignore_eos": True, "stream": True}) as response:
            lines = response.iter_lines()  # held: a line generator dropped after next() would close the connection
            next(line for line in lines if line.startswith("data: {"))
            assert live.engine.free_slots == 1
    wait_for(lambda: live.engine.free_slots == 4, what="the samples' slots to be freed")
    live.wait_idle()


def test_the_openai_sdk_gets_n_choices(live):
    sdk = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    completion = sdk.completions.create(model="tiny", prompt="the river", max_tokens=4, n=3, seed=5)
    assert [c.index for c in completion.choices] == [0, 1, 2]


def test_a_seeded_sample_is_the_same_alone_and_decoded_beside_other_samples(client, live):
    """Sampling is one computation over the batch's rows, each with its own parameters and generator: a seeded
    request's text does not depend on what else is decoded with it."""
    seeded = {"prompt": PROMPTS[0], "temperature": 0.9, "top_p": 0.95, "seed": 5, "max_tokens": 16}
    alone = text_of(client, **seeded)
    others = [{"prompt": PROMPTS[1], "temperature": 1.3, "top_k": 20, "max_tokens": 16},
              {"prompt": PROMPTS[2], "temperature": 0.7, "min_p": 0.1, "max_tokens": 16},
              {"prompt": PROMPTS[0], "temperature": 0, "max_tokens": 16}]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        with httpx.Client(base_url=live.url, timeout=60) as other_client:
            futures = [pool.submit(text_of, other_client, **body) for body in others]
            beside = pool.submit(text_of, client, **seeded).result()
            for future in futures:
                future.result()
    assert beside == alone
    assert any(r.kind == "decode" and r.tokens > 1 for r in list(live.engine.step_log)[-40:])
