"""Tool calls on chat completions, as vLLM serves them without a parser of a model's own call format: a named
`tool_choice` holds the reply to that function's parameters (a JSON schema, through structured output), and
`"required"` to a JSON array of one or more calls `{"name", "parameters"}` of the tools given; the reply's JSON
becomes the message's `tool_calls`. `"auto"` (the model deciding whether to call, written in its own format) needs
such a parser and is refused; `"none"` gives the template the tools and replies in text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .errors import InvalidRequestError
from .guided import ANY_OBJECT, Guide
from .protocol import ChatCompletionRequest, NamedToolChoice


@dataclass(frozen=True)
class ToolCalling:
    """How a reply becomes tool calls: one call of `name`, or (name None) the calls of a required array."""

    name: str | None
    guide: Guide


def tool_calling(body: ChatCompletionRequest) -> ToolCalling | None:
    """The tool calling `body` asks for, or None (a reply in text). Raises InvalidRequestError for a choice that is
    not served or names no tool given."""
    choice, tools = body.tool_choice, body.tools or []
    if not tools:
        if choice not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        return None
    if choice in (None, "auto"):
        raise InvalidRequestError("automatic tool choice is not served (it needs a parser of the model's own call "
                                  "format): name a function in tool_choice, or send 'required' or 'none'",
                                  param="tool_choice", code="auto_tool_choice_unavailable")
    if choice == "none":
        return None
    # a function declared without parameters takes any object
    parameters = {tool.function.name: tool.function.parameters or ANY_OBJECT for tool in tools}
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in parameters:
            raise InvalidRequestError(f"tool_choice names {name!r}, which is not among the tools given "
                                      f"({', '.join(parameters)})", param="tool_choice")
        return ToolCalling(name, Guide("json_schema", json.dumps(parameters[name]), "tools"))
    calls = {"type": "array", "minItems": 1, "items": {"anyOf": [
        {"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
         "required": ["name", "parameters"], "additionalProperties": False}
        for name, schema in parameters.items()]}}
    if body.parallel_tool_calls is False:
        calls["maxItems"] = 1
    return ToolCalling(None, Guide("json_schema", json.dumps(calls), "tools"))


def tool_calls(calling: ToolCalling, text: str, call_id: str) -> list[dict] | None:
    """The message's tool_calls of a whole reply, each with an id from `call_id`; None when the reply is not the
    complete JSON (cut by max_tokens): it is then given as text."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if calling.name is not None:  # the arguments as generated (a stream sends them as they come)
        made = [(calling.name, text)]
    else:
        made = [(call["name"], json.dumps(call["parameters"], ensure_ascii=False)) for call in value]
    return [{"id": f"{call_id}-{i}", "type": "function", "function": {"name": name, "arguments": arguments}}
            for i, (name, arguments) in enumerate(made)]
