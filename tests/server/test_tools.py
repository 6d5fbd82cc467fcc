"""Tool calls on chat completions over real HTTP, on the embedded model (whose byte-level vocabulary spells JSON)
with a chat template that lists the tools: a named tool_choice and "required" give tool_calls whose arguments
follow the functions' schemas, streamed too; "auto" and faulty choices are refused by name."""

import json

import httpx
import openai
import pytest

from server import schemas

from server_helpers import embedded_with_template

pytest.importorskip("xgrammar")
TEMPLATE = ("{% if tools %}tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}\n{% endif %}"
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                             "parameters": {"type": "object", "properties": {
                                                 "city": {"type": "string", "maxLength": 20},
                                                 "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                                 "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "local"]}}, "required": ["zone"],
    "additionalProperties": False}}}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris for the next three days?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with embedded_with_template(tmp_path_factory.mktemp("tools"), TEMPLATE) as live:
        yield live


def _weather_arguments(arguments: str) -> bool:
    value = json.loads(arguments)
    return set(value) == {"city", "days"} and len(value["city"]) <= 20 and 1 <= value["days"] <= 7


def test_a_named_tool_choice_calls_that_function(server):
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    named = {"type": "function", "function": {"name": "get_weather"}}
    chat = sdk.chat.completions.create(model="embedded", messages=MESSAGES, tools=[WEATHER, TIME], tool_choice=named,
                                       max_tokens=60, temperature=0)
    message = chat.choices[0].message
    assert message.content is None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert _weather_arguments(call.function.arguments)
    plain = sdk.chat.completions.create(model="embedded", messages=MESSAGES, max_tokens=4, temperature=0)
    assert chat.usage.prompt_tokens > plain.usage.prompt_tokens  # the template listed the tools
    chunks = list(sdk.chat.completions.create(model="embedded", messages=MESSAGES, tools=[WEATHER, TIME],
                                              tool_choice=named, max_tokens=60, temperature=0, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id.startswith("call-") and deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments for d in deltas) == call.function.arguments
    schemas.ChatCompletion.model_validate(chat.model_dump(exclude_unset=True))
    for chunk in chunks:
        schemas.ChatCompletionChunk.model_validate(chunk.model_dump(exclude_unset=True))


def test_required_tool_calls_follow_the_tools_given(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        body = {"messages": MESSAGES, "tools": [WEATHER, TIME], "tool_choice": "required", "max_tokens": 120,
                "temperature": 0.8, "seed": 3}
        message = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        assert message["tool_calls"], message
        for call in message["tool_calls"]:
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            assert name in ("get_weather", "get_time")
            assert _weather_arguments(arguments) if name == "get_weather" else json.loads(arguments)["zone"] in \
                ("utc", "local")
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        streamed = [d for e in events for d in e["choices"][0]["delta"].get("tool_calls") or []]
        assert [c["function"] for c in streamed] == [c["function"] for c in message["tool_calls"]]
        one = client.post("/v1/chat/completions", json={**body, "parallel_tool_calls": False}).json()
        assert len(one["choices"][0]["message"]["tool_calls"]) == 1


@pytest.mark.parametrize("fields, param, match", [
    ({"tools": [WEATHER]}, "tool_choice", "automatic tool choice is not served"),
    ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice", "automatic tool choice is not served"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice",
     "not among the tools given (get_weather)"),
    ({"tool_choice": "required"}, "tool_choice", "tool_choice needs tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "guided_regex",
     "held to its function's schema"),
    ({"tools": [{"type": "retrieval"}]}, "tools", "'function'"),
])
def test_tool_choices_not_served_are_refused_by_name(server, fields, param, match):
    response = httpx.post(server.url + "/v1/chat/completions", json={"messages": MESSAGES, **fields}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and match in error["message"], error


def test_tool_choice_none_replies_in_text(server):
    body = {"messages": MESSAGES, "tools": [WEATHER], "tool_choice": "none", "max_tokens": 8, "temperature": 0}
    message = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]
    assert isinstance(message["content"], str) and "tool_calls" not in message
