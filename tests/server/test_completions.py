"""POST /v1/completions against the real tiny model over loopback HTTP: shapes, streaming, sampling,
stop strings, echo and logprobs, and the scale bucket each request uses (in its prefill and every step)."""

import json
import shutil

import httpx
import pytest
import torch

from runtime import Decimation, batch_scales, load_model
from runtime.tokenizer import Tokenizer
from scale_bank import Bank
from server import schemas

from server_helpers import SERVER_FLAGS, TRAINING_LENGTH, LiveServer, make_bank

PROMPT = "the river ran past the old mill"


def complete(client, **body) -> dict:
    response = client.post("/v1/completions", json={"max_tokens": 12, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def stream(client, **body) -> list:
    """The decoded `data:` events of a streamed completion, "[DONE]" kept as a string."""
    events = []
    with client.stream("POST", "/v1/completions", json={"max_tokens": 12, "temperature": 0, **body,
                                                         "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_completion_object_and_usage(client, live):
    body = complete(client, prompt=PROMPT, max_tokens=7)
    prompt_tokens = len(live.components.tokenizer.encode(PROMPT))
    assert body["object"] == "text_completion" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None and isinstance(choice["text"], str)
    assert choice["finish_reason"] in ("length", "stop")
    completion_tokens = body["usage"]["completion_tokens"]
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}
    assert completion_tokens == 7 or choice["finish_reason"] == "stop"


def test_stream_is_ordered_chunks_then_usage_then_done_and_equals_the_non_streamed_text(client):
    events = stream(client, prompt=PROMPT, max_tokens=10, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    *chunks, usage = events[:-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10
    assert all(c["object"] == "text_completion" and len(c["choices"]) == 1 for c in chunks)
    assert len({c["id"] for c in events[:-1]}) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert all("usage" not in c for c in chunks)
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == complete(client, prompt=PROMPT, max_tokens=10)["choices"][0]["text"]
    assert stream(client, prompt=PROMPT, max_tokens=3)[-2].get("usage") is None  # not asked: no usage chunk


def test_continuous_usage_stats_give_the_usage_so_far_in_every_chunk(client, live):
    events = stream(client, prompt=PROMPT, max_tokens=10,
                    stream_options={"include_usage": True, "continuous_usage_stats": True})
    *chunks, last = events[:-1]
    so_far = [c["usage"]["completion_tokens"] for c in chunks]
    assert so_far == sorted(so_far) and so_far[-1] == last["usage"]["completion_tokens"] == 10
    assert all(c["usage"]["prompt_tokens"] == last["usage"]["prompt_tokens"] for c in chunks)
    alone = stream(client, prompt=PROMPT, max_tokens=4, stream_options={"continuous_usage_stats": True})
    assert all("usage" not in c for c in alone[:-1])  # as vLLM reads it: only with include_usage
    samples = stream(client, prompt=[PROMPT, "a long road"], n=2, max_tokens=5, temperature=1.0, seed=3,
                     ignore_eos=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    *chunks, last = samples[:-1]
    prompt_tokens = [len(live.components.tokenizer.encode(p)) for p in (PROMPT, "a long road")]
    for index in range(4):  # each chunk counts its own choice (prompt i × n + j), as vLLM's do
        mine = [c["usage"] for c in chunks if c["choices"][0]["index"] == index]
        assert [u["completion_tokens"] for u in mine][-1] == 5
        assert {u["prompt_tokens"] for u in mine} == {prompt_tokens[index // 2]}
    assert last["usage"] == {"prompt_tokens": sum(prompt_tokens), "completion_tokens": 20, "total_tokens":
                             sum(prompt_tokens) + 20}  # the last counts them all


def test_max_tokens_zero_and_echo(client):
    body = complete(client, prompt=PROMPT, max_tokens=0)
    assert body["choices"][0]["text"] == "" and body["usage"]["completion_tokens"] == 0
    assert body["choices"][0]["finish_reason"] == "length"
    echoed = complete(client, prompt=PROMPT, max_tokens=5, echo=True)
    plain = complete(client, prompt=PROMPT, max_tokens=5)
    assert echoed["choices"][0]["text"] == PROMPT + plain["choices"][0]["text"]
    chunks = stream(client, prompt=PROMPT, max_tokens=5, echo=True)[:-1]
    assert chunks[0]["choices"][0]["text"].startswith(PROMPT)
    assert "".join(c["choices"][0]["text"] for c in chunks) == echoed["choices"][0]["text"]


def test_echo_of_token_ids_is_their_text(client, model_dirs):
    ids = Tokenizer(model_dirs["mamba1"] / "tokenizer.json").encode(PROMPT)
    assert complete(client, prompt=ids, max_tokens=0, echo=True)["choices"][0]["text"] == PROMPT
    assert stream(client, prompt=ids, max_tokens=2, echo=True)[0]["choices"][0]["text"].startswith(PROMPT)


def test_return_token_ids_gives_each_choices_prompt_and_generated_tokens(client, live):
    """vLLM's return_token_ids: each choice's prompt token ids (streamed: in its first chunk only) and its
    generated ones (streamed: those new in each chunk), which decode to its text."""
    tokenizer = live.components.tokenizer
    prompts = [PROMPT, "a boat"]
    body = complete(client, prompt=prompts, n=2, temperature=0.9, seed=3, ignore_eos=True, return_token_ids=True)
    schemas.Completion.model_validate(body)
    for choice in body["choices"]:
        assert choice["prompt_token_ids"] == tokenizer.encode(prompts[choice["index"] // 2])
        assert len(choice["token_ids"]) == 12 and tokenizer.decode(choice["token_ids"], True) == choice["text"]
    assert "token_ids" not in complete(client, prompt=PROMPT)["choices"][0]
    events = [e for e in stream(client, prompt=PROMPT, ignore_eos=True, return_token_ids=True) if e != "[DONE]"]
    chosen = [e["choices"][0] for e in events if e["choices"]]
    assert chosen[0]["prompt_token_ids"] == tokenizer.encode(PROMPT)
    assert all(c["prompt_token_ids"] is None for c in chosen[1:])
    whole = complete(client, prompt=PROMPT, ignore_eos=True, return_token_ids=True)["choices"][0]["token_ids"]
    assert [t for c in chosen for t in c["token_ids"]] == whole


def test_stop_string_split_across_tokens_is_not_emitted(client):
    baseline = complete(client, prompt=PROMPT, max_tokens=20, logprobs=0)
    text, tokens = baseline["choices"][0]["text"], baseline["choices"][0]["logprobs"]["tokens"]
    assert "".join(tokens) == text
    # the last character of one token and the first of the next, first found at that boundary in the text
    ends = [len("".join(tokens[:i + 1])) for i in range(len(tokens))]
    stop = next(text[end - 1:end + 1] for end in ends[2:-1] if text.index(text[end - 1:end + 1]) == end - 1)
    expected = text[:text.index(stop)]
    stopped = complete(client, prompt=PROMPT, max_tokens=20, stop=[stop, "never there"])
    assert stopped["choices"][0]["text"] == expected and stopped["choices"][0]["finish_reason"] == "stop"
    chunks = stream(client, prompt=PROMPT, max_tokens=20, stop=stop)[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    unmet = complete(client, prompt=PROMPT, max_tokens=20, stop="never there")
    assert unmet["choices"][0]["text"] == text


def test_same_seed_same_text_different_seeds_differ(client):
    def sampled(seed):
        return complete(client, prompt=PROMPT, max_tokens=24, temperature=1.0, seed=seed)["choices"][0]["text"]

    first = sampled(7)
    assert sampled(7) == first
    assert len({first, sampled(8), sampled(9)}) == 3
    streamed = stream(client, prompt=PROMPT, max_tokens=24, temperature=1.0, seed=7)[:-1]
    assert "".join(c["choices"][0]["text"] for c in streamed) == first


def test_generated_logprobs_name_the_chosen_tokens(client):
    body = complete(client, prompt=PROMPT, max_tokens=6, logprobs=3)
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == body["usage"]["completion_tokens"]
    for logprob, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert 1 <= len(top) <= 3 and logprob <= 0
        assert max(top.values()) == pytest.approx(logprob)  # greedy: the chosen token is the most likely


@pytest.mark.parametrize("prompt_text, bucket", [(PROMPT, "none"), (" ".join([PROMPT] * 6), "128")])
def test_echo_logprobs_equal_the_runtimes_token_logprobs(client, model_dirs, prompt_text, bucket):
    """lm-evaluation-harness scoring: echo + logprobs + max_tokens 0, over several prefill chunks."""
    model_dir = model_dirs["mamba1"]
    ids = Tokenizer(model_dir / "tokenizer.json").encode(prompt_text)
    body = complete(client, prompt=ids, max_tokens=0, echo=True, logprobs=1, scale_bucket=bucket)
    assert body["scale_bucket"] == bucket
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    model = load_model(model_dir).model
    scales = None if bucket == "none" else batch_scales([Bank.load(model_dir / "bank").scale_set(bucket)],
                                                        model.config, "cpu")
    tokens = torch.tensor([ids])
    hidden, _ = model.hidden_states(tokens, scales=scales)
    expected = model.token_logprobs(hidden[:, :-1], tokens[:, 1:], slice_len=7)[0]
    assert len(ids) > 16 or bucket == "none"
    assert torch.allclose(torch.tensor(logprobs["token_logprobs"][1:]), expected, atol=1e-4)
    assert body["choices"][0]["text"] == prompt_text


def test_prompt_logprobs_score_each_prompt_token_with_its_rank(client, model_dirs):
    """vLLM's prompt_logprobs: each prompt token (none for the first) by id, with its logprob (the same as echo's),
    its rank among the vocabulary, and the k most likely tokens there; alongside echo's own k."""
    text = Tokenizer(model_dirs["mamba1"] / "tokenizer.json").encode(" ".join([PROMPT] * 3))
    greedy = complete(client, prompt=text, max_tokens=6, logprobs=0, return_tokens_as_token_ids=True)
    continuation = [int(t.removeprefix("token_id:")) for t in greedy["choices"][0]["logprobs"]["tokens"]]
    ids = text + continuation  # the model's own greedy tokens: each the most likely at its place (rank 1)
    body = complete(client, prompt=ids, max_tokens=2, echo=True, logprobs=1, prompt_logprobs=20)
    choice = body["choices"][0]
    scored, echoed = choice["prompt_logprobs"], choice["logprobs"]
    assert len(scored) == len(ids) and scored[0] is None
    assert all(top is None or len(top) == 1 for top in echoed["top_logprobs"])  # echo keeps its own k
    schemas.Completion.model_validate(body)
    ranks = []
    for token_id, entry, echoed_logprob in zip(ids[1:], scored[1:], echoed["token_logprobs"][1:len(ids)]):
        first, *others = entry.items()
        assert first[0] == str(token_id) and first[1]["logprob"] == pytest.approx(echoed_logprob)
        assert first[1]["decoded_token"] == client.post("/detokenize", json={"tokens": [token_id]}).json()["prompt"]
        alternatives = [v["logprob"] for k, v in others]
        assert [v["rank"] for k, v in others] == sorted(v["rank"] for k, v in others)
        assert alternatives == sorted(alternatives, reverse=True)
        rank = first[1]["rank"]
        ranks.append(rank)
        if rank <= 20:  # then the top 20 hold every more likely token
            assert rank - 1 == sum(lp > first[1]["logprob"] for lp in alternatives)
        else:
            assert len(others) == 20 and min(alternatives) >= first[1]["logprob"]
    assert ranks[-len(continuation):] == [1] * len(continuation) and max(ranks) > 20
    assert "prompt_logprobs" not in complete(client, prompt=ids, max_tokens=2)["choices"][0]


def test_prompt_logprobs_refused_on_a_stream_and_on_chat(client):
    response = client.post("/v1/completions", json={"prompt": PROMPT, "prompt_logprobs": 1, "stream": True})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt_logprobs"
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "prompt_logprobs": 1})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "prompt_logprobs"


def test_a_quantised_model_is_served_with_its_own_bank(model_dirs, tmp_path):
    """--quantize int8: the served log-probabilities are the INT8 runtime's (with the INT8 bank's scales), not
    the full-precision model's."""
    model_dir = shutil.copytree(model_dirs["mamba1"], tmp_path / "model", ignore=shutil.ignore_patterns("bank"))
    make_bank(model_dir / "bank", model_dir, quantize="int8")
    ids = Tokenizer(model_dir / "tokenizer.json").encode(" ".join([PROMPT] * 6))
    with LiveServer(["--model", str(model_dir), "--quantize", "int8", *SERVER_FLAGS]) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.get("/v1/models").json()["data"][0]["quantization"] == "int8"
        body = complete(client, prompt=ids, max_tokens=0, echo=True, logprobs=1, scale_bucket="128")
    served = torch.tensor(body["choices"][0]["logprobs"]["token_logprobs"][1:])
    tokens = torch.tensor([ids])

    def runtime_logprobs(quantize):
        loaded = load_model(model_dir, quantize=quantize)
        bank = Bank.load(model_dir / "bank")
        scales = batch_scales([bank.scale_set("128")], loaded.config, "cpu")
        hidden, _ = loaded.model.hidden_states(tokens, scales=scales)
        return loaded.model.token_logprobs(hidden[:, :-1], tokens[:, 1:])[0]

    torch.testing.assert_close(served, runtime_logprobs("int8"), atol=1e-4, rtol=0)
    assert (served - runtime_logprobs(None)).abs().max() > 1e-3


def test_echo_logprobs_equal_transformers(client, model_dirs):
    """The served checkpoint was saved by transformers; its own float32 forward scores the prompt the same."""
    from transformers import MambaForCausalLM

    model_dir = model_dirs["mamba1"]
    ids = Tokenizer(model_dir / "tokenizer.json").encode(" ".join([PROMPT] * 3))
    body = complete(client, prompt=ids, max_tokens=0, echo=True, logprobs=1, scale_bucket="none")
    reference = MambaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(reference(torch.tensor([ids]), use_cache=False).logits[0, :-1].float(), -1)
    expected = logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    got = torch.tensor(body["choices"][0]["logprobs"]["token_logprobs"][1:])
    assert torch.allclose(got, expected, atol=1e-3)


def greedy_reference(model_dir, prompt_ids, max_tokens, bucket, in_decode=True, decimation=None) -> str:
    """A direct runtime greedy loop with `bucket`'s scales in the prefill and (when `in_decode`) every step,
    and `decimation` in the prefill."""
    model = load_model(model_dir).model
    tokenizer = Tokenizer(model_dir / "tokenizer.json")
    scales = batch_scales([Bank.load(model_dir / "bank").scale_set(bucket)], model.config, "cpu")
    logits, state = model.prefill(torch.tensor([prompt_ids]), scales=scales, decimation=decimation)
    out = []
    for _ in range(max_tokens):
        token = int(logits[0, :tokenizer.vocab_size].argmax())
        if token == tokenizer.eos_token_id:
            break
        out.append(token)
        logits = model.step(torch.tensor([token]), state, scales if in_decode else None)
    return tokenizer.decode(out)


@pytest.fixture(scope="module")
def mamba2_live(model_dirs):
    with LiveServer(["--model", str(model_dirs["mamba2"]), *SERVER_FLAGS]) as server:
        yield server


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_bucket_scales_are_used_in_prefill_and_every_decode_step(arch, live, mamba2_live, model_dirs):
    server = live if arch == "mamba1" else mamba2_live
    ids = Tokenizer(model_dirs[arch] / "tokenizer.json").encode(" ".join([PROMPT] * 2))
    with httpx.Client(base_url=server.url, timeout=60) as client:
        scaled = complete(client, prompt=ids, max_tokens=24, scale_bucket="128")
        identity = complete(client, prompt=ids, max_tokens=24, scale_bucket="none")
    assert scaled["scale_bucket"] == "128" and scaled["scale_method"] == "delta"
    assert identity["scale_bucket"] == "none" and identity["scale_method"] is None
    text = scaled["choices"][0]["text"]
    assert text == greedy_reference(model_dirs[arch], ids, 24, "128")
    assert text != identity["choices"][0]["text"]
    assert text != greedy_reference(model_dirs[arch], ids, 24, "128", in_decode=False)  # the reference code's bug


def test_auto_applies_the_scales_of_the_bucket_it_picks(client, model_dirs):
    """The HTTP side picks the bucket and sends its name; the engine's model runner applies that name's scales:
    an auto request's text is its bucket's, named in the request."""
    ids = Tokenizer(model_dirs["mamba1"] / "tokenizer.json").encode(" ".join([PROMPT] * 2))
    max_tokens = 128 - len(ids)  # n = 128: bucket "128" under auto
    auto, named, identity = (complete(client, prompt=ids, max_tokens=max_tokens, **bucket)
                             for bucket in ({}, {"scale_bucket": "128"}, {"scale_bucket": "none"}))
    assert auto["scale_bucket"] == named["scale_bucket"] == "128" and auto["scale_method"] == "delta"
    assert auto["choices"][0]["text"] == named["choices"][0]["text"] != identity["choices"][0]["text"]


@pytest.mark.parametrize("prompt_tokens, max_tokens, bucket, beyond", [
    (10, 20, "none", False),  # n = 30 ≤ training length 64
    (10, 54, "none", False),  # n = 64
    (10, 55, "128", False),
    (100, 100, "256", False),
    (300, 100, "512", False),
    (600, 10, "512", True),  # beyond every bucket: the largest, and said so
])
def test_auto_bucket_follows_prompt_plus_max_tokens(client, prompt_tokens, max_tokens, bucket, beyond):
    assert TRAINING_LENGTH == 64
    body = complete(client, prompt=[5] * prompt_tokens, max_tokens=max_tokens)
    assert (body["scale_bucket"], body["scale_beyond_largest"]) == (bucket, beyond)
    chunks = stream(client, prompt=[5] * prompt_tokens, max_tokens=max_tokens)[:-1]
    for chunk in (chunks[0], chunks[-1]):
        assert (chunk["scale_bucket"], chunk["scale_beyond_largest"]) == (bucket, beyond)


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_a_decimate_bucket_decimates_the_whole_prompt_in_one_prefill(arch, live, mamba2_live, model_dirs):
    """Bucket "512" is decimate {"layer": 1, "l_base": 64}: its text is the runtime's decimated greedy text."""
    server = live if arch == "mamba1" else mamba2_live
    ids = Tokenizer(model_dirs[arch] / "tokenizer.json").encode(" ".join([PROMPT] * 8))
    assert len(ids) > 2 * 64 > 16  # L_base + R = 65 of them go on past layer 1; and more than one chunk
    with httpx.Client(base_url=server.url, timeout=60) as client:
        decimated = complete(client, prompt=ids, max_tokens=16, scale_bucket="512")
        identity = complete(client, prompt=ids, max_tokens=16, scale_bucket="none")
        streamed = stream(client, prompt=ids, max_tokens=16, scale_bucket="512")[:-1]
    assert (decimated["scale_bucket"], decimated["scale_method"]) == ("512", "decimate")
    assert identity["scale_method"] is None
    text = decimated["choices"][0]["text"]
    assert text == greedy_reference(model_dirs[arch], ids, 16, "512", decimation=Decimation(layer=1, l_base=64))
    assert text != identity["choices"][0]["text"]
    assert "".join(c["choices"][0]["text"] for c in streamed) == text
    assert {c["scale_method"] for c in streamed} == {"decimate"}
    [prefill] = [r for r in server.engine.step_log if r.kind == "prefill" and decimated["id"] in r.request_ids]
    assert prefill.tokens == len(ids) and prefill.prompts_done == (decimated["id"],)  # one piece, alone, though
    # --prefill-chunk is 16


def test_a_decimated_prompt_has_no_prompt_logprobs(client):
    response = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1,
                                                    "scale_bucket": "512"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("scale_bucket", "decimated_prompt_logprobs")
    assert "bucket 512 decimates the prompt" in error["message"]
    assert complete(client, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)["choices"][0]["logprobs"]


def test_models_lists_the_bank_and_health_is_open(client):
    [card] = client.get("/v1/models").json()["data"]
    assert card["id"] == "tiny" and card["max_model_len"] == 4096 and card["training_context_length"] == TRAINING_LENGTH
    assert [(b["name"], b["length"], b["method"]) for b in card["scale_buckets"]] == [
        ("128", 128, "delta"), ("256", 256, "delta"), ("512", 512, "decimate")]
    assert client.get("/health").json() == {"status": "ok"}


def test_training_length_flag_overrides_the_recorded_one(model_dirs):
    argv = ["--model", str(model_dirs["mamba1"]), "--training-length", "200", *SERVER_FLAGS]
    with LiveServer(argv) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.get("/v1/models").json()["data"][0]["training_context_length"] == 200
        assert complete(client, prompt=[5] * 100, max_tokens=100)["scale_bucket"] == "none"  # n = 200
        assert complete(client, prompt=[5] * 100, max_tokens=101)["scale_bucket"] == "256"
