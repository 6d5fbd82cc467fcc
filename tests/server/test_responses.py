"""OpenAI's Responses API over real HTTP, on the embedded model with a chat template, through the OpenAI SDK: a
response is the chat completion of its input (instructions first), streamed as the API's typed events with the
same text; fields this server does not serve are refused by name, and the server serves on."""

import json

import httpx
import openai
import pytest

from server import schemas

from server_helpers import LiveServer, embedded_with_template

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
INSTRUCTIONS = "Answer in one sentence."
QUESTION = "Where does the river go?"
EXPECTED_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
                   "response.content_part.added"]
CLOSING_EVENTS = ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                  "response.completed"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with embedded_with_template(tmp_path_factory.mktemp("responses"), TEMPLATE) as live:
        yield live


@pytest.fixture
def sdk(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _chat_text(sdk, messages, max_tokens):
    chat = sdk.chat.completions.create(model="embedded", messages=messages, max_tokens=max_tokens, temperature=0,
                                       extra_body={"ignore_eos": True})
    return chat.choices[0].message.content, chat.usage


def test_a_response_is_the_chat_completion_of_its_input(sdk):
    response = sdk.responses.create(model="embedded", instructions=INSTRUCTIONS, input=QUESTION, max_output_tokens=12,
                                    temperature=0, extra_body={"ignore_eos": True}, metadata={"case": "one"})
    text, chat_usage = _chat_text(sdk, [{"role": "system", "content": INSTRUCTIONS},
                                        {"role": "user", "content": QUESTION}], 12)
    assert response.output_text == text and text
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.input_tokens == chat_usage.prompt_tokens and response.usage.output_tokens == 12
    assert response.usage.total_tokens == chat_usage.prompt_tokens + 12
    assert response.id.startswith("resp-") and response.output[0].role == "assistant"
    assert response.metadata == {"case": "one"} and response.store is False
    schemas.ResponseObject.model_validate(response.model_dump(exclude_unset=True))
    stopped = sdk.responses.create(model="embedded", input=QUESTION, max_output_tokens=200, temperature=0,
                                   extra_body={"stop": [".", "\n"]})  # vLLM's stop strings end it early
    assert stopped.status == "completed" and stopped.incomplete_details is None
    assert stopped.usage.output_tokens < 200


def test_messages_with_parts_and_the_developer_role_are_the_chats(sdk):
    parts = [{"type": "input_text", "text": "Where does"}, {"type": "input_text", "text": "the river go?"}]
    response = sdk.responses.create(model="embedded", max_output_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True},
                                    input=[{"role": "developer", "content": INSTRUCTIONS},
                                           {"type": "message", "role": "user", "content": parts},
                                           {"role": "assistant", "content": [{"type": "output_text",
                                                                              "text": "To the sea."}]},
                                           {"role": "user", "content": "And then?"}])
    text, _ = _chat_text(sdk, [{"role": "system", "content": INSTRUCTIONS},
                               {"role": "user", "content": "Where does\nthe river go?"},
                               {"role": "assistant", "content": "To the sea."},
                               {"role": "user", "content": "And then?"}], 8)
    assert response.output_text == text


def test_a_streamed_response_sends_the_apis_events_with_the_same_text(server, sdk):
    body = {"model": "embedded", "instructions": INSTRUCTIONS, "input": QUESTION, "max_output_tokens": 12,
            "temperature": 0, "ignore_eos": True}
    whole = httpx.post(server.url + "/v1/responses", json=body, timeout=60).json()
    with httpx.stream("POST", server.url + "/v1/responses", json={**body, "stream": True}, timeout=60) as stream:
        lines = [line for line in stream.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    events = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert [e["type"] for e in events] == names  # each event is named as its type says
    assert names[:4] == EXPECTED_EVENTS and names[-4:] == CLOSING_EVENTS
    assert set(names[4:-4]) == {"response.output_text.delta"}
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == whole["output"][0]["content"][0]["text"] == events[-4]["text"]
    completed = events[-1]["response"]
    assert completed["output"][0]["content"] == whole["output"][0]["content"] and completed["usage"] == whole["usage"]
    assert completed["output"][0]["id"] == events[2]["item"]["id"] == events[-4]["item_id"]
    assert completed["status"] == "incomplete" and events[0]["response"]["status"] == "in_progress"
    for event in events:
        schemas.ResponseStreamEvent.model_validate(event)
    streamed = list(sdk.responses.create(stream=True, **{k: v for k, v in body.items() if k != "ignore_eos"},
                                         extra_body={"ignore_eos": True}))
    assert streamed[-1].type == "response.completed" and streamed[-1].response.output_text == text


def test_a_json_schema_text_format_holds_the_output_to_it(sdk):
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "properties": {"river": {"type": "string", "maxLength": 12}}, "required": ["river"],
              "additionalProperties": False}
    response = sdk.responses.create(model="embedded", input=QUESTION, max_output_tokens=40, temperature=0,
                                    text={"format": {"type": "json_schema", "name": "answer", "schema": schema,
                                                     "strict": True}})
    value = json.loads(response.output_text)
    assert set(value) == {"river"} and len(value["river"]) <= 12


@pytest.mark.parametrize("fields, param", [
    ({"previous_response_id": "resp-1"}, "previous_response_id"),
    ({"background": True}, "background"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"n": 2}, "n"),
    ({"input": []}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input"),
    ({"input": [{"role": "user"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text"),
    ({"text": {"format": {"type": "json_object"}}, "response_format": {"type": "json_object"}}, "text"),
    ({"max_output_tokens": -1}, "max_output_tokens"),
])
def test_what_is_not_served_is_refused_by_name(server, fields, param):
    body = {"model": "embedded", "input": QUESTION, "max_output_tokens": 4, **fields}
    answer = httpx.post(server.url + "/v1/responses", json=body, timeout=60)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
    named = {"input_image": "'input_image' part", "function_call_output": "'function_call_output' item",
             "'tool'": "input[0].role", "'user'}": "input[0].content",
             "'input_text'}": "input[0].content[0].text: Field required"}
    assert all(words in answer.json()["error"]["message"] for kind, words in named.items() if kind in str(fields))
    assert httpx.post(server.url + "/v1/responses", json={"input": QUESTION, "max_output_tokens": 2},
                      timeout=60).status_code == 200  # and serves on


def test_a_model_without_a_chat_template_names_the_input(model_dirs):
    with LiveServer(["--model", str(model_dirs["mamba1"])]) as live:
        answer = httpx.post(live.url + "/v1/responses", json={"input": "the river"}, timeout=60)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "input"
    assert answer.json()["error"]["code"] == "no_chat_template"


def test_a_stored_response_is_not_found_and_says_why(server):
    answer = httpx.get(server.url + "/v1/responses/resp-1", timeout=60)
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "response_not_found"
    assert "stores no responses" in answer.json()["error"]["message"]
