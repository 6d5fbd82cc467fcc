"""The sampling fields vLLM honours beyond OpenAI's, over real HTTP on the tiny model: each one changes what is
generated as vLLM's does (or is refused with a 400 naming it), `stop_reason` says what ended a choice, and
X-Request-Id follows a request into its completion id and the logs."""

import concurrent.futures
import random

import httpx
import pytest
import torch

from server.detokenizer import OutputText
from server.logits_adjustment import adjusted, bad_word_ends
from server.request import Request, SamplingParams
from server.sampling import choose

PROMPT = "the river ran past the old mill"


def complete(client, **body) -> dict:
    response = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def generated_ids(client, **body) -> list[int]:
    """The completion's token ids, as vLLM's return_tokens_as_token_ids names them."""
    choice = complete(client, logprobs=0, return_tokens_as_token_ids=True, **body)["choices"][0]
    assert all(t.startswith("token_id:") for t in choice["logprobs"]["tokens"])
    return [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]


@pytest.fixture(scope="module")
def tokenizer(live):
    return live.components.tokenizer


@pytest.fixture(scope="module")
def eos(tokenizer) -> int:
    return tokenizer.eos_token_id


def test_logit_bias_forbids_and_forces_tokens(client, tokenizer):
    first = generated_ids(client)[0]
    assert generated_ids(client, logit_bias={str(first): -100})[0] != first
    forced = tokenizer.encode("e")[0]
    body = complete(client, max_tokens=5, logit_bias={str(forced): 100})
    assert body["choices"][0]["text"] == "eeeee"


def test_presence_and_frequency_penalties_cut_repetition(client):
    def distinct(**fields):
        return len(set(generated_ids(client, max_tokens=40, **fields)))

    plain = distinct()
    assert plain < 30, "the greedy text must repeat tokens for this test to show anything"
    assert distinct(presence_penalty=2.0) > plain
    assert distinct(frequency_penalty=2.0) > plain


def test_repetition_penalty_changes_the_text(client):
    plain = complete(client, max_tokens=40)["choices"][0]["text"]
    assert complete(client, max_tokens=40, repetition_penalty=1.0)["choices"][0]["text"] == plain
    assert complete(client, max_tokens=40, repetition_penalty=3.0)["choices"][0]["text"] != plain


def test_penalties_and_bias_follow_vllms_arithmetic(tokenizer):
    params = SamplingParams(8, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25,
                            logit_bias=((4, 3.0),), min_tokens=3, stop_token_ids=(5,))
    request = Request("r", [1, 2], params, "none", OutputText(tokenizer), lambda _: None)
    request.output_ids = [2, 3, 3]  # 3 tokens: min_tokens is reached, nothing is banned any more
    logits = torch.tensor([[1.0, 2.0, -2.0, 4.0, 0.5, 1.0, 1.0]])
    out = adjusted(logits, [request], eos_token_id=0)[0]
    # token 1 (prompt): 2 / 2; token 2 (prompt and once generated): -2 × 2 - 0.5 - 0.25; token 3 (twice): 4 / 2 - 0.5
    # - 0.5; token 4: + 3
    assert out.tolist() == pytest.approx([1.0, 1.0, -4.75, 1.0, 3.5, 1.0, 1.0])
    request = Request("r", [1, 2], params, "none", OutputText(tokenizer), lambda _: None)
    request.output_ids = [2]
    banned = adjusted(logits, [request], eos_token_id=0)[0]
    assert banned[0] == float("-inf") and banned[5] == float("-inf") and torch.isfinite(banned[1:5]).all()
    assert adjusted(logits, [Request("p", [1], SamplingParams(8), "none", OutputText(tokenizer),
                                     lambda _: None)], 0) is logits  # no field set: the model's own scores


def test_a_requests_adjustments_step_by_step_equal_those_made_afresh(tokenizer):
    """The penalties' books are kept from step to step and brought up to date with each new token (not rebuilt
    from the prompt and output every step): at every step they adjust as books made from scratch would."""
    params = SamplingParams(8, repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.25,
                            allowed_token_ids=(1, 2, 3, 5, 6, 3, 1))
    kept = Request("r", [1, 4], params, "none", OutputText(tokenizer), lambda _: None)
    logits = torch.tensor([[1.0, 2.0, -2.0, 4.0, 0.5, 1.0, -1.0]])
    for step, token in enumerate([3, 3, 5, 1, 3]):
        afresh = Request("r", [1, 4], params, "none", OutputText(tokenizer), lambda _: None)
        afresh.output_ids = list(kept.output_ids)
        assert adjusted(logits, [kept], 0)[0].tolist() == adjusted(logits, [afresh], 0)[0].tolist(), step
        kept.output_ids += [token] * (step % 2 + 1)  # one token a step, or two (multi-step decode)
    assert adjusted(logits, [kept], 0)[0][[0, 4]].isneginf().all()  # outside allowed_token_ids


def test_allowed_token_ids_are_the_only_tokens_chosen(client, tokenizer):
    first = generated_ids(client)[0]
    allowed = [t for t in tokenizer.encode(" river mill") if t != first]
    for sampled in ({}, {"temperature": 1.0, "seed": 3}):
        ids = generated_ids(client, allowed_token_ids=allowed, **sampled)
        assert len(ids) == 12 and set(ids) <= set(allowed)


def test_bad_words_are_never_generated(client, tokenizer):
    """A word the greedy text holds, banned as vLLM bans it: its tokens, with and without a leading space, never
    appear in a row in the completion."""
    plain = complete(client, max_tokens=30)["choices"][0]["text"]
    word = max(plain.split(), key=len)
    assert len(tokenizer.encode(" " + word)) > 1, "a word of several tokens shows the prefix rule"
    banned = complete(client, max_tokens=30, bad_words=[word], return_tokens_as_token_ids=True, logprobs=0)
    ids = [int(t.removeprefix("token_id:")) for t in banned["choices"][0]["logprobs"]["tokens"]]
    for form in (word, " " + word):
        sequence = tokenizer.encode(form)
        assert all(ids[i:i + len(sequence)] != sequence for i in range(len(ids)))
    assert banned["choices"][0]["text"] != plain


def test_bad_word_ends_match_the_generated_tokens_only():
    assert bad_word_ends([(7,), (1, 2, 3), (2, 9)], generated=[5, 1, 2]) == [7, 3, 9]
    assert bad_word_ends([(1, 2, 3), (4, 5)], generated=[2]) == []  # the prompt does not count


@pytest.mark.parametrize("fields, match", [
    ({"allowed_token_ids": [0], "min_tokens": 2}, "only tokens that end the text"),
    ({"allowed_token_ids": [0, 5], "min_tokens": 2, "stop_token_ids": [5]}, "only tokens that end the text"),
])
def test_allowed_token_ids_that_every_choice_would_ban_are_refused(client, fields, match):
    response = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, **fields})
    assert response.status_code == 400 and match in response.json()["error"]["message"], response.text
    assert response.json()["error"]["param"] == "allowed_token_ids"


def test_bad_words_banning_every_allowed_token_are_refused(client, tokenizer):
    single = next(w for w in ("e", "a", "the") if len(tokenizer.encode(w)) == 1)
    response = client.post("/v1/completions", json={"prompt": PROMPT, "bad_words": [single],
                                                    "allowed_token_ids": tokenizer.encode(single)})
    assert response.status_code == 400 and "ban every token" in response.json()["error"]["message"]


def test_bans_that_leave_no_token_are_lifted_for_the_step(tokenizer):
    params = SamplingParams(8, allowed_token_ids=(2, 3), bad_words=((1, 2), (1, 3)))
    request = Request("r", [4], params, "none", OutputText(tokenizer), lambda _: None)
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0]])
    request.output_ids = [1]  # both allowed tokens end a bad word here
    assert adjusted(logits, [request], eos_token_id=0)[0].tolist() == [float("-inf"), float("-inf"), 1.0, 2.0]
    request.output_ids = [0]
    assert adjusted(logits, [request], eos_token_id=0)[0].tolist() == [float("-inf"), float("-inf"), 1.0, 2.0]


def test_a_penalty_that_overflows_keeps_the_penalised_tokens_likeliest(tokenizer):
    """A repetition penalty of 1e-300 sends the prompt's positive logits to +inf; sampling must not read NaN."""
    request = Request("r", [1, 3], SamplingParams(8, temperature=1.0, repetition_penalty=1e-300), "none",
                      OutputText(tokenizer), lambda _: None)
    scores = adjusted(torch.tensor([[1.0, 2.0, -1.0, 0.5]]), [request], eos_token_id=None)
    assert torch.isfinite(scores).all() and scores.argmax() == 1
    chosen = {choose(scores, [request.params], [random.Random(s)]).item() for s in range(20)}
    assert chosen <= {1, 3}  # the prompt's tokens with positive logits, now the largest floats


def test_min_tokens_holds_off_the_end_of_text(client, eos):
    forced_end = {str(eos): 100}
    ended = complete(client, logit_bias=forced_end)
    assert ended["usage"]["completion_tokens"] == 1 and ended["choices"][0]["finish_reason"] == "stop"
    held = complete(client, logit_bias=forced_end, min_tokens=5)
    assert held["usage"]["completion_tokens"] == 6 and held["choices"][0]["finish_reason"] == "stop"
    assert held["choices"][0]["stop_reason"] is None  # the end of text: no stop string or stop token


def test_ignore_eos_generates_past_the_end_of_text(client, eos, tokenizer):
    body = complete(client, max_tokens=4, logit_bias={str(eos): 100}, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 4 and body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["text"] == ""  # a special token adds no text (vLLM's skip_special_tokens default)
    shown = complete(client, max_tokens=4, logit_bias={str(eos): 100}, ignore_eos=True, skip_special_tokens=False)
    assert shown["choices"][0]["text"] == tokenizer.decode([eos]) * 4 != ""


def test_stop_token_ids_end_the_completion_and_name_themselves(client, tokenizer):
    ids = generated_ids(client, max_tokens=20)
    at = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])  # a token first generated at i
    body = complete(client, max_tokens=20, stop_token_ids=[ids[at]])
    choice = body["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", ids[at])
    assert body["usage"]["completion_tokens"] == at + 1  # the stop token is generated, not shown
    assert choice["text"] == tokenizer.decode(ids[:at])


def test_stop_reason_names_the_stop_string(client):
    text = complete(client, max_tokens=20)["choices"][0]["text"]
    stop = text[4:7]
    choice = complete(client, max_tokens=20, stop=["never there", stop])["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop)
    assert complete(client, max_tokens=3)["choices"][0]["stop_reason"] is None  # length


def test_include_stop_str_in_output_ends_the_text_with_the_stop_string(client):
    text = complete(client, max_tokens=20)["choices"][0]["text"]
    stop = text[4:7]
    choice = complete(client, max_tokens=20, stop=[stop], include_stop_str_in_output=True)["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop)
    assert choice["text"] == text[:text.index(stop) + len(stop)]
    assert complete(client, max_tokens=20, stop=[stop])["choices"][0]["text"] == text[:text.index(stop)]


def test_truncate_prompt_tokens_runs_the_prompts_last_tokens(client, tokenizer, live):
    ids = tokenizer.encode(PROMPT)
    kept = complete(client, truncate_prompt_tokens=3, echo=True)
    as_ids = complete(client, prompt=ids[-3:], echo=True)
    assert kept["usage"]["prompt_tokens"] == 3
    assert kept["choices"][0]["text"] == as_ids["choices"][0]["text"]  # the text of the tokens kept, then theirs
    assert complete(client, prompt=ids, truncate_prompt_tokens=3)["choices"][0]["text"] == \
        complete(client, prompt=ids[-3:])["choices"][0]["text"]
    assert complete(client, truncate_prompt_tokens=-1)["usage"]["prompt_tokens"] == len(ids)  # the limit's worth
    limit = live.config.http.max_context
    too_long = [ids[0]] * (limit + 5)
    assert client.post("/v1/completions", json={"prompt": too_long, "max_tokens": 1}).status_code == 413  # too long
    assert complete(client, prompt=too_long, max_tokens=1, truncate_prompt_tokens=100)["usage"]["prompt_tokens"] == 100


def test_min_tokens_defers_stop_strings(client, tokenizer):
    ids = generated_ids(client, max_tokens=20)
    stop = tokenizer.decode(ids[:1])  # the first token's text: a stop string at once
    assert complete(client, max_tokens=20, stop=stop)["usage"]["completion_tokens"] == 1
    deferred = complete(client, max_tokens=20, stop=stop, min_tokens=3)
    assert deferred["usage"]["completion_tokens"] > 3 or deferred["choices"][0]["finish_reason"] == "length"
    assert deferred["choices"][0]["text"].startswith(stop)


def test_min_p_one_keeps_only_the_most_likely_token(client):
    greedy = complete(client, max_tokens=16)["choices"][0]["text"]
    for seed in (1, 2):
        assert complete(client, max_tokens=16, temperature=1.0, seed=seed, min_p=1.0)["choices"][0]["text"] == greedy
    assert complete(client, max_tokens=16, temperature=1.0, seed=1, min_p=0.0)["choices"][0]["text"] != greedy


@pytest.mark.parametrize("field, value, match", [
    ("response_format", {"type": "json_schema", "json_schema": {}}, "Field required"),
    ("logit_bias", {"x": 1}, "keys are token ids"),
    ("logit_bias", {"3": 101}, "[-100, 100]"),
    ("logit_bias", {"96": 1}, "token id 96 is outside the vocabulary"),
    ("stop_token_ids", [96], "token id 96 is outside the vocabulary"),
    ("presence_penalty", 2.5, "less than or equal to 2"),
    ("frequency_penalty", -3, "greater than or equal to -2"),
    ("repetition_penalty", 0, "greater than 0"),
    ("min_p", 1.5, "less than or equal to 1"),
    ("min_tokens", 13, "min_tokens (13) is more than max_tokens (12)"),
    ("ignore_eos", "yes", "boolean"),
    ("use_beam_search", True, "use_beam_search is not served"),
    ("suffix", "the end", "suffix is not served"),
    ("guided_json", 5, "Input should be an object"),
    ("guided_choice", "a", "should be a valid array"),
    ("allowed_token_ids", [], "at least 1 item"),
    ("allowed_token_ids", [3, 96], "token id 96 is outside the vocabulary"),
    ("bad_words", [" "], "1 to 256 characters besides spaces"),
    ("bad_words", ["x"] * 65, "at most 64 bad words"),
    ("truncate_prompt_tokens", 0, "got 0"),
    ("truncate_prompt_tokens", -2, "greater than or equal to -1"),
])
def test_bad_sampling_fields_are_refused_by_name(client, field, value, match):
    response = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and match in error["message"], error


def test_a_text_response_format_is_served(client):
    assert complete(client, response_format={"type": "text"})["choices"][0]["text"]


def test_the_request_id_is_echoed_or_made_and_names_the_completion(client):
    response = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2},
                           headers={"X-Request-Id": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42" and response.json()["id"] == "cmpl-trace-42"
    made = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert len(made.headers["x-request-id"]) == 32 and made.json()["id"] == "cmpl-" + made.headers["x-request-id"]
    unusable = client.get("/health", headers={"X-Request-Id": "x" * 200})
    assert len(unusable.headers["x-request-id"]) == 32
    assert client.get("/v1/nothing").headers["x-request-id"]  # errors carry it too


def test_requests_that_share_a_client_request_id_each_get_their_own_completion(client, live):
    """A request id is the client's to choose, so two running at once may share one; each still gets its own
    tokens, and leaving one cancels only that one."""
    bodies = [{"prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
              for prompt in (PROMPT, "a long road")]
    alone = [client.post("/v1/completions", json=body).json()["choices"][0]["text"] for body in bodies]
    shared = {"X-Request-Id": "same-7"}
    with httpx.Client(base_url=live.url, timeout=60) as other:
        with other.stream("POST", "/v1/completions", json={**bodies[1], "max_tokens": 4000, "stream": True},
                          headers=shared) as left:
            lines = left.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                answers = [pool.submit(client.post, "/v1/completions", json=body, headers=shared) for body in bodies]
                texts = [answer.result().json()["choices"][0]["text"] for answer in answers]
    assert texts == alone
    live.wait_idle()  # the stream that was left is cancelled: its slot is back
