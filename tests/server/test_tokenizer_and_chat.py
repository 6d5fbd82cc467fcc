"""vLLM's routes around completions, over real HTTP: /tokenize, /detokenize, /tokenizer_info (as lm-evaluation-
harness's remote tokenizer reads it), /version, GET /v1/models/{id}, CORS, SageMaker's /ping and /invocations, and
chat completions with the model's chat template; and the requests lm-evaluation-harness's local-completions sends,
batched and concurrent."""

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from runtime import __version__
from runtime.tokenizer import Tokenizer
from server import schemas
from server.chat import ChatService, template_variables
from server.chat_template import ChatTemplate, TokenizerConfig
from server.errors import InvalidRequestError
from server.protocol import ChatCompletionRequest, ChatMessage

from server_helpers import SERVER_FLAGS, LiveServer

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the pass key?"}]
RENDERED = "<|endoftext|>system: be brief\nuser: what is the pass key?\nassistant:"


@pytest.fixture(scope="module")
def chat_live(model_dirs, tmp_path_factory):
    """The tiny model with a chat template in its tokenizer_config.json, and CORS for one origin."""
    model_dir = shutil.copytree(model_dirs["mamba1"], tmp_path_factory.mktemp("chat") / "model")
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": TEMPLATE, "bos_token": {"content": "<|endoftext|>"}, "eos_token": "<|endoftext|>"}))
    with LiveServer(["--model", str(model_dir), *SERVER_FLAGS, "--allowed-origins", "https://app.example"]) as s:
        yield s


@pytest.fixture
def chat_client(chat_live):
    with httpx.Client(base_url=chat_live.url, timeout=60) as c:
        yield c


def test_tokenize_and_detokenize_round_trip(client, live):
    tokenizer = live.components.tokenizer
    body = client.post("/tokenize", json={"prompt": "the river", "return_token_strs": True}).json()
    assert body["tokens"] == tokenizer.encode("the river") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 4096 and len(body["token_strs"]) == body["count"]
    assert client.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": "the river"}
    bad = client.post("/detokenize", json={"tokens": [96]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert client.post("/tokenize", json={"prompt": "x", "model": "gpt-4"}).status_code == 404


def test_tokenizer_info_is_what_lm_evals_remote_tokenizer_reads(client, live):
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and "bos_token" in info and info["chat_template"] is None
    # lm-eval takes the end-of-text id as the first token of /tokenize of eos_token
    eos_ids = client.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()
    assert eos_ids["tokens"] == [live.components.tokenizer.eos_token_id]


def test_version_and_model_retrieval(client, live):
    assert client.get("/version").json() == {"version": __version__}
    sdk = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    model = sdk.models.retrieve("tiny")
    assert model.id == "tiny" and model.model_extra["max_model_len"] == 4096
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("gpt-4")


def test_chat_without_a_template_says_how_to_give_one(client):
    response = client.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "no_chat_template" and "--chat-template FILE" in error["message"]


def test_chat_renders_the_template_and_completes_it(chat_client, chat_live):
    rendered = chat_client.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    assert rendered == chat_live.components.tokenizer.encode(RENDERED)
    assert chat_client.get("/tokenizer_info").json()["chat_template"] == TEMPLATE
    expected = chat_client.post("/v1/completions", json={"prompt": RENDERED, "max_tokens": 12,
                                                         "temperature": 0}).json()["choices"][0]["text"]
    sdk = openai.OpenAI(base_url=chat_live.url + "/v1", api_key="unused", max_retries=0)
    chat = sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, n=2)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    assert [c.message.content for c in chat.choices] == [expected, expected]
    assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens == len(rendered)
    chunks = list(sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=12,
                                              temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens // 2
    schemas.ChatCompletion.model_validate(chat.model_dump(exclude_unset=True))
    for chunk in chunks:
        schemas.ChatCompletionChunk.model_validate(chunk.model_dump(exclude_unset=True))


def test_chat_logprobs_are_those_of_the_rendered_prompts_completion(chat_client, chat_live):
    """OpenAI's chat logprobs: each token's logprob and top alternatives as /v1/completions gives them for the
    rendered prompt, with bytes that rebuild the text; streamed, the chunks' entries add up to the same."""
    completion = chat_client.post("/v1/completions", json={"prompt": RENDERED, "max_tokens": 10, "temperature": 0,
                                                           "logprobs": 3}).json()["choices"][0]
    legacy = completion["logprobs"]
    sdk = openai.OpenAI(base_url=chat_live.url + "/v1", api_key="unused", max_retries=0)
    chat = sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert [e.token for e in content] == legacy["tokens"]
    assert [e.logprob for e in content] == pytest.approx(legacy["token_logprobs"])
    for entry, top in zip(content, legacy["top_logprobs"]):
        assert {t.token: t.logprob for t in entry.top_logprobs} == pytest.approx(top)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob and len(entry.top_logprobs) == 3
    assert bytes(b for e in content for b in e.bytes).decode() == chat.choices[0].message.content == \
        completion["text"]
    schemas.ChatCompletion.model_validate(chat.model_dump(exclude_unset=True))

    chunks = list(sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
                                              logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks for e in c.choices[0].logprobs.content]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in content]
    for chunk in chunks:
        schemas.ChatCompletionChunk.model_validate(chunk.model_dump(exclude_unset=True))

    plain = chat_client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4, "logprobs": True,
                                                           "return_tokens_as_token_ids": True}).json()
    entries = plain["choices"][0]["logprobs"]["content"]
    assert len(entries) == plain["usage"]["completion_tokens"] and all(e["top_logprobs"] == [] for e in entries)
    assert all(e["token"].startswith("token_id:") for e in entries)
    without = chat_client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4}).json()
    assert without["choices"][0]["logprobs"] is None


def test_chat_echo_continues_the_last_message_in_its_role(chat_client):
    """vLLM's echo: without a generation prompt the reply continues the last message, in its role, and starts
    with its text; a reply in another role echoes nothing."""
    opening = "what is the pass key? the pass key is"
    messages = [MESSAGES[0], {"role": "assistant", "content": opening}]
    prompt = chat_client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    completion = chat_client.post("/v1/completions", json={"prompt": prompt["tokens"], "max_tokens": 8,
                                                           "temperature": 0}).json()["choices"][0]["text"]
    body = {"messages": messages, "add_generation_prompt": False, "echo": True, "max_tokens": 8, "temperature": 0}
    message = chat_client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": opening + completion}
    with chat_client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["delta"]["content"].startswith(opening)
    assert "".join(e["choices"][0]["delta"]["content"] for e in events) == opening + completion
    asked = chat_client.post("/v1/chat/completions", json={"messages": MESSAGES, "echo": True, "max_tokens": 4,
                                                           "temperature": 0}).json()["choices"][0]["message"]
    assert asked["role"] == "assistant" and not asked["content"].startswith(MESSAGES[-1]["content"])


def renderer(template: str) -> ChatService:
    """A chat service of `template` that only renders (rendering needs no engine)."""
    return ChatService(None, TokenizerConfig({}, ChatTemplate(template, "test")))  # type: ignore[arg-type]


def test_continue_final_message_cuts_the_prompt_after_the_last_messages_text():
    chat = renderer("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>"
                    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    messages = [ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", content=" the key is ")]
    assert chat.render(messages, False) == "<user>hi</user><assistant> the key is </assistant>"
    assert chat.render(messages, False, continue_final_message=True) == "<user>hi</user><assistant> the key is"
    with pytest.raises(InvalidRequestError, match="does not put the last message's text in the prompt"):
        renderer("{{ messages | length }}").render(messages, False, continue_final_message=True)


def test_the_template_reads_the_requests_kwargs_tools_and_documents():
    chat = renderer("{% for d in documents %}[{{ d['title'] }}]{% endfor %}{{ tools | length }} {{ flavour }}: "
                    "{{ messages[0]['content'] }}")
    body = ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": "hi"}], "documents": [{"title": "a"}, {"title": "b"}],
        "chat_template_kwargs": {"flavour": "plain"},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]})
    assert chat.render(body.messages, True, template_variables(body)) == "[a][b]1 plain: hi"


def test_continue_final_message_leaves_the_last_turn_open(chat_client, chat_live):
    """vLLM's continue_final_message over HTTP: the reply continues the prompt that ends with the last message's
    text."""
    opening = "what is the pass key? the pass key is"
    messages = [MESSAGES[0], {"role": "assistant", "content": opening}]
    shape = {"messages": messages, "add_generation_prompt": False}
    left_open = chat_client.post("/tokenize", json={**shape, "continue_final_message": True}).json()["tokens"]
    assert chat_live.components.tokenizer.decode(left_open).endswith(opening)
    completion = chat_client.post("/v1/completions", json={"prompt": left_open, "max_tokens": 8,
                                                           "temperature": 0}).json()["choices"][0]["text"]
    reply = chat_client.post("/v1/chat/completions", json={**shape, "continue_final_message": True, "max_tokens": 8,
                                                           "temperature": 0}).json()["choices"][0]["message"]
    assert reply == {"role": "assistant", "content": completion}
    both = chat_client.post("/v1/chat/completions", json={"messages": messages, "continue_final_message": True})
    assert both.status_code == 400 and "set add_generation_prompt to false" in both.json()["error"]["message"]


def test_chat_refuses_what_it_does_not_serve(chat_client):
    def error(**body):
        response = chat_client.post("/v1/chat/completions", json={"messages": MESSAGES, **body})
        assert response.status_code == 400, response.text
        return response.json()["error"]

    assert error(top_logprobs=2)["param"] == "top_logprobs"  # without logprobs, as OpenAI refuses it
    assert error(chat_template="{{ messages }}")["param"] == "chat_template"  # as vLLM refuses it by default
    assert error(logprobs=True, top_logprobs=21)["param"] == "top_logprobs"
    assert error(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])["param"] == \
        "messages"
    assert error(messages=[])["param"] == "messages"
    # a text part without its text: named where it is, not as "messages: Input should be a valid string"
    part = error(messages=[{"role": "user", "content": [{"type": "text"}]}])
    assert part["param"] == "messages" and part["message"] == "messages[0].content[0].text: Field required"


def test_cors_answers_the_allowed_origin_only(chat_client, client):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    allowed = chat_client.options("/v1/completions", headers=preflight)
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    other = chat_client.options("/v1/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    assert "access-control-allow-origin" not in client.get("/health", headers={"Origin": "https://app.example"}).headers


def test_chat_return_token_ids_gives_the_rendered_prompts_and_the_replys_tokens(chat_client, chat_live):
    tokenizer = chat_live.components.tokenizer
    body = {"messages": [{"role": "user", "content": "the river"}], "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    rendered = chat_client.post("/tokenize", json={"messages": body["messages"]}).json()["tokens"]
    answer = chat_client.post("/v1/chat/completions", json=body).json()
    schemas.ChatCompletion.model_validate(answer)
    assert answer["prompt_token_ids"] == rendered
    assert tokenizer.decode(answer["choices"][0]["token_ids"], True) == answer["choices"][0]["message"]["content"]
    with chat_client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["prompt_token_ids"] == rendered and all("prompt_token_ids" not in c for c in chunks[1:])
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == answer["choices"][0]["token_ids"]


def texts(answer: dict) -> list[str]:
    """The generated texts of a completion, chat completion or response."""
    if "choices" in answer:
        return [c["text"] if "text" in c else c["message"]["content"] for c in answer["choices"]]
    return ["".join(part["text"] for item in answer["output"] for part in item["content"])]


def test_sagemakers_invocations_go_to_the_route_whose_body_they_are(chat_client):
    """As vLLM serves SageMaker: /ping is the health check (GET and POST), and /invocations answers a chat body
    as chat completions, a completions body as completions and a responses body as responses, streams included."""
    assert chat_client.get("/ping").json() == chat_client.post("/ping").json() == {"status": "ok"}
    messages = [{"role": "user", "content": "the river"}]
    for route, body in (("/v1/chat/completions", {"messages": messages}), ("/v1/completions", {"prompt": "the river"}),
                        ("/v1/responses", {"input": "the river", "max_output_tokens": 6})):
        body = {"max_tokens": 6, "temperature": 0, **body} if route != "/v1/responses" else {"temperature": 0, **body}
        direct, invoked = chat_client.post(route, json=body).json(), chat_client.post("/invocations", json=body).json()
        assert invoked["object"] == direct["object"] and texts(invoked) == texts(direct) != [""], invoked
    with chat_client.stream("POST", "/invocations", json={"prompt": "the river", "max_tokens": 3,
                                                          "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert response.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"
    refused = chat_client.post("/invocations", json={"max_tokens": 3})
    assert refused.status_code == 400 and "has none of them" in refused.json()["error"]["message"]
    assert chat_client.post("/invocations", content=b"[1, 2]").status_code == 400


def test_a_chat_template_file_overrides_the_config(model_dirs, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    tokenizer = Tokenizer(model_dirs["mamba1"] / "tokenizer.json")
    config = TokenizerConfig.load(model_dirs["mamba1"], tokenizer, template)
    assert config.chat_template.render([{"role": "user", "content": "hi"}], True, {}) == "hi"
    assert config.special_tokens["eos_token"] == "<|endoftext|>"


def test_lm_eval_local_completions_batches_score_as_single_prompts(live, client):
    """local-completions with --batch_size 8 and num_concurrent=4: token-id prompts, echo, logprobs 1, max_tokens 0,
    four batches in flight at once; each loglikelihood equals the single-prompt call's (to float32 rounding).
    Then a generation batch."""
    tokenizer = live.components.tokenizer
    texts = [f"the river ran past the old mill {i} times, and the boat went by" for i in range(32)]
    contexts = [tokenizer.encode(t) for t in texts]
    scoring = {"model": "tiny", "max_tokens": 0, "temperature": 0, "logprobs": 1, "seed": 1234, "echo": True}

    def post(prompt):
        response = client.post("/v1/completions", json={**scoring, "prompt": prompt})
        assert response.status_code == 200, response.text
        return [c["logprobs"]["token_logprobs"] for c in response.json()["choices"]]

    with ThreadPoolExecutor(4) as pool:
        batched = [lp for batch in pool.map(post, [contexts[i:i + 8] for i in range(0, 32, 8)]) for lp in batch]
    # equal within float32 rounding: a BLAS may sum a batch's longer product in another order than one prompt's
    for got, alone in zip(batched, [post(ids)[0] for ids in contexts], strict=True):
        assert got[0] is None and got[1:] == pytest.approx(alone[1:], rel=1e-5, abs=1e-5)
    generation = client.post("/v1/completions", json={"model": "tiny", "prompt": texts[:8], "max_tokens": 8,
                                                      "temperature": 0, "stop": ["\n\n"], "seed": 1234}).json()
    assert [c["index"] for c in generation["choices"]] == list(range(8))
