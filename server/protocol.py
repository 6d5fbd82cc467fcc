"""The request bodies as pydantic sees them: the HTTP boundary, the only place pydantic is used."""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from .errors import InvalidRequestError
from .guided import Guide

Body = TypeVar("Body", bound=BaseModel)

MAX_LOGPROBS = 20  # alternatives per token, as vLLM allows (OpenAI: 5)
# Stop strings are searched for on the engine thread after every token (server.detokenizer), in up to
# count × length comparisons of up to length characters each, which holds back every other stream, so both are
# bounded: OpenAI allows 4 strings, vLLM any number; 16 of up to 256 characters cover real uses (chat turn
# markers, code fences).
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
# Each bad word (twice: with and without a leading space) is compared with a completion's last tokens before every
# token it chooses, on the engine thread, so their number is bounded like the stop strings'.
MAX_BAD_WORDS = 64
# A request's constraint is compiled on both sides (server.guided), off the event loop and off the engine thread but
# not for free: 64k characters hold thousands of choices or a schema of hundreds of fields.
MAX_GUIDE_CHARS = 65536


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension: with include_usage, usage so far in every chunk


class JsonSchemaFormat(BaseModel):
    """OpenAI's response_format.json_schema: the schema the completion's JSON follows."""

    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)
    name: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's: plain text, any JSON object, or JSON following a schema (server.guided holds the completion to
    it)."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        _schema_goes_with_its_type(self.type, self.json_schema is not None, "json_schema (with its schema)")
        return self


def _schema_goes_with_its_type(kind: str, has_schema: bool, schema_field: str) -> None:
    """A structured-output format's schema is given with type 'json_schema', and only with it."""
    if (kind == "json_schema") != has_schema:
        raise ValueError(f"{schema_field} goes with type 'json_schema', and only with it")


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs (its field since v0.12, in place of the guided_* fields): a JSON schema, any JSON
    object, a regular expression, one of some strings or an EBNF grammar, one of them. Its other keys
    (whitespace_pattern, structural_tag, …) are refused, not ignored."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None


class SamplingFields(BaseModel):
    """What completions and chat completions share: the model, how many tokens, how they are chosen, streaming."""

    # strict: "5" is not a number, true is not 1. Unknown OpenAI fields (user, suffix, ...) are ignored, but
    # every field that changes what is generated is either honoured here or refused.
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(None, ge=0)  # None: the endpoint's default
    # None (these and the other sampling fields): the model's generation config's default, or the neutral value
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)  # JSON's Infinity would make every score NaN
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1, 0 or None: off
    min_p: float | None = Field(None, ge=0, le=1)  # vLLM's extension; 0 or None: off
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's extension: these tokens end the completion too
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    best_of: int | None = Field(None, ge=1)
    logit_bias: dict[str, float] | None = None  # token id (as a string, JSON's keys) → bias in [-100, 100]
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)  # vLLM's extension; 1: off
    min_tokens: int = Field(0, ge=0)  # vLLM's extension
    ignore_eos: bool = False  # vLLM's extension
    include_stop_str_in_output: bool = False  # vLLM's extension: the stop string that ended it ends its text
    skip_special_tokens: bool = True  # vLLM's extension: special tokens (end of text) add no text
    # vLLM's extension: only the prompt's last k tokens are run (-1: the context limit's worth)
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    response_format: ResponseFormat | None = None
    allowed_token_ids: list[int] | None = Field(None, min_length=1)  # vLLM's extension: only these are chosen
    bad_words: list[str] | None = None  # vLLM's extension: words never generated, as vLLM tokenises and bans them
    scale_bucket: str = "auto"  # "auto", "none", or a bank bucket name
    return_tokens_as_token_ids: bool = False  # vLLM's extension: logprobs name tokens "token_id:<id>"
    return_token_ids: bool | None = None  # vLLM's extension: the prompt's and the generated token ids too
    # vLLM's structured output (server.guided), one a request: a JSON schema, a regular expression, one of some
    # strings, an EBNF grammar
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None  # the same, as vLLM asks for it since v0.12
    # OpenAI's and vLLM's fields for what this server does not do: refused when set, rather than ignored
    suffix: Any = None
    use_beam_search: bool = False

    @field_validator("suffix", "use_beam_search")
    @classmethod
    def _not_served(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, False):
            raise ValueError(f"{info.field_name} is not served: this server has no insertion or beam search")
        return value

    @field_validator("bad_words")
    @classmethod
    def _bounded_bad_words(cls, words: list[str] | None) -> list[str] | None:
        if words is not None and len(words) > MAX_BAD_WORDS:
            raise ValueError(f"at most {MAX_BAD_WORDS} bad words, got {len(words)}")
        for word in words or []:
            if not word.strip() or len(word) > MAX_STOP_LENGTH:
                raise ValueError(f"a bad word has 1 to {MAX_STOP_LENGTH} characters besides spaces, got {word!r}")
        return words

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _some_tokens(cls, keep: int | None) -> int | None:
        if keep == 0:
            raise ValueError("keeps the prompt's last k ≥ 1 tokens (or -1: the context limit's worth), got 0")
        return keep

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"keys are token ids, got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"biases lie in [-100, 100], got {value} for token {key}")
        return bias

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(strings)}")
        longest = max(strings, key=len, default="")
        if len(longest) > MAX_STOP_LENGTH:
            raise ValueError(f"a stop string has at most {MAX_STOP_LENGTH} characters, got one of {len(longest)}")
        return stop


class CompletionRequest(SamplingFields):
    # a string, token ids, or a list of either (several prompts: their choices come in prompt order)
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # vLLM's extension: each choice's prompt_logprobs, the prompt's tokens scored with this many alternatives
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")  # images, audio: not for a text model
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # other fields (name, tool_calls, ...) go to the chat template as they are
    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: str | list[TextPart] | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of its arguments; None: any object


class Tool(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)  # OpenAI's newer name for max_tokens
    logprobs: bool = False  # each generated token's logprob (and top_logprobs alternatives)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True  # vLLM's extension: end the prompt with the assistant turn's opening
    # vLLM's extension: the prompt ends inside the last message (its turn left open), which the reply continues
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's extension: more variables for the template
    documents: list[dict[str, Any]] | None = None  # vLLM's extension: the template's `documents` (a RAG template's)
    chat_template: Any = None  # vLLM's, a template of the request's own: refused, as vLLM refuses it by default
    # vLLM's extension: the reply's text starts with the last message's, when that message is in the reply's role
    echo: bool = False
    prompt_logprobs: Any = None  # vLLM's extension, served on /v1/completions: refused here
    tools: list[Tool] | None = Field(None, max_length=128)  # given to the chat template as `tools`
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # server.tools
    parallel_tool_calls: bool | None = None  # false: "required" makes one call

    @field_validator("chat_template")
    @classmethod
    def _the_servers_template(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("a request's own chat template is not served: the server renders with its model's (or "
                             "the one given with --chat-template)")
        return value

    @model_validator(mode="after")
    def _one_open_turn(self) -> ChatCompletionRequest:
        _open_turn_or_new_one(self.continue_final_message, self.add_generation_prompt)
        return self


class ResponseInputText(BaseModel):
    """A text part of an input message (an earlier assistant turn's is `output_text`)."""

    model_config = ConfigDict(strict=True, extra="ignore")  # annotations and the like add nothing to the prompt
    type: Literal["input_text", "output_text"]
    text: str


class ResponseInputMessage(BaseModel):
    """An input message of the Responses API; images, files and tool outputs are not for this text model."""

    model_config = ConfigDict(strict=True, extra="ignore")  # an earlier output's id and status
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ResponseInputText]


class ResponseTextFormat(BaseModel):
    """The Responses API's text.format: plain text, any JSON object, or JSON following `schema`."""

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseTextFormat:
        _schema_goes_with_its_type(self.type, self.schema_ is not None, "a schema")
        return self


class ResponseText(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # verbosity: for reasoning models
    format: ResponseTextFormat = ResponseTextFormat.model_validate({"type": "text"})


class ResponsesRequest(SamplingFields):
    """OpenAI's Responses API as vLLM serves it without storing responses: the input (a string: one user message;
    or messages) after `instructions` (a system message), rendered by the chat template and generated as a chat
    completion of one choice. The other sampling fields are the chat's (vLLM's extensions included)."""

    input: str | list[ResponseInputMessage]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=0)
    text: ResponseText = ResponseText()
    store: bool = True  # nothing is stored whatever it says: the response object says store false
    metadata: dict[str, str] | None = None  # returned as given
    # what this server does not do on this route: refused when set, rather than ignored
    previous_response_id: str | None = None
    tools: list[Any] | None = None
    background: bool = False
    top_logprobs: int | None = None
    include: list[str] | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _text_messages(cls, items: Any) -> Any:
        """Says why an item or part of another kind (a tool's output, an image) is refused: this is a text model.
        The messages' own fields are the model's to check (parse_body names the one at fault)."""
        for i, item in enumerate(items if isinstance(items, list) else []):
            if not isinstance(item, dict):
                continue
            kind = item.get("type", "message")
            if kind != "message":
                raise ValueError(f"input[{i}] is a {kind!r} item: this server takes messages of text")
            parts = item.get("content")
            for part in parts if isinstance(parts, list) else []:
                part_kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(part_kind, str) and part_kind not in ("input_text", "output_text"):
                    raise ValueError(f"input[{i}] has a {part_kind!r} part: this text model takes input_text parts")
        return items

    @field_validator("previous_response_id", "background")
    @classmethod
    def _not_stored(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, False):
            raise ValueError(f"{info.field_name} is not served: this server stores no responses (send the whole "
                             "conversation as input)")
        return value

    @field_validator("tools", "top_logprobs", "include")
    @classmethod
    def _on_chat(cls, value: Any, info: ValidationInfo) -> Any:
        if value:
            raise ValueError(f"{info.field_name} is not served on /v1/responses: /v1/chat/completions serves tools "
                             "and logprobs")
        return value

    @field_validator("n")
    @classmethod
    def _one_output(cls, n: int) -> int:
        if n != 1:
            raise ValueError("a response has one output: n is 1 here (/v1/chat/completions serves n choices)")
        return n


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered by the chat template."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_open_turn(self) -> TokenizeRequest:
        _open_turn_or_new_one(self.continue_final_message, self.add_generation_prompt)
        return self


def _open_turn_or_new_one(continue_final_message: bool, add_generation_prompt: bool) -> None:
    """A prompt ends either inside the last message or with a new turn's opening, not both (vLLM's rule)."""
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message continues the last message: set add_generation_prompt to false")


class InvocationRequest(BaseModel):
    """SageMaker's /invocations (as vLLM serves it): a body of one of the generation routes, routed by its shape:
    `messages` to chat completions, else `prompt` to completions, else `input` to responses."""

    model_config = ConfigDict(extra="allow")
    messages: Any = None
    prompt: Any = None
    input: Any = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    tokens: list[int]


def parse_body(model: type[Body], body: bytes) -> Body:
    """`body` (JSON) as `model`. Raises InvalidRequestError naming the fault (and the field, where there is one)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as bad:
        raise InvalidRequestError(f"the request body is not valid UTF-8 ({bad.reason} at byte {bad.start})") from None
    try:
        return model.model_validate_json(text)
    except ValidationError as bad:
        errors = bad.errors()
        if errors[0]["type"] == "json_invalid":
            raise InvalidRequestError(f"malformed JSON: {errors[0]['ctx']['error']}") from None
        # a field that takes several forms (a string or a list of messages) fails once for each: the error that
        # reached deepest into the body is about the form the client meant (the first such)
        document = json.loads(text)
        where, error = max(((_path_in(document, e), e) for e in errors), key=lambda found: len(found[0]))
        param = where[0] if where and isinstance(where[0], str) else None
        raise InvalidRequestError(f"{_dotted(where) or 'body'}: {error['msg']}", param=param) from None


def _path_in(document: Any, error: Any) -> list[str | int]:
    """The part of a validation error's location that names places in the body (keys and indexes), without the
    names pydantic gives a union's forms; a missing field's name last."""
    path: list[str | int] = []
    node, loc = document, error["loc"]
    for i, part in enumerate(loc):
        if (isinstance(node, dict) and part in node) or (isinstance(node, list) and isinstance(part, int)
                                                          and 0 <= part < len(node)):
            path.append(part)
            node = node[part]
        elif error["type"] == "missing" and i == len(loc) - 1:
            path.append(part)
    return path


def _dotted(path: list[str | int]) -> str:
    """["messages", 0, "content"] -> "messages[0].content"."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).removeprefix(".")


def guide_of(body: SamplingFields) -> Guide | None:
    """The constraint of a request (response_format, one of vLLM's guided_* fields or a key of its
    structured_outputs), or None. Raises InvalidRequestError when more than one is set."""
    so = body.structured_outputs
    structured = [] if so is None else _guides("structured_outputs.", so.json_, so.json_object, so.regex, so.choice,
                                               so.grammar)
    given = [guide for guide in (
        _response_format_guide(body.response_format),
        *_guides("guided_", body.guided_json, None, body.guided_regex, body.guided_choice, body.guided_grammar),
        *structured,
    ) if guide is not None]
    if len(given) > 1:
        raise InvalidRequestError(f"one constraint a request: {', '.join(g.field for g in given)} were all given",
                                  param=given[1].field)
    if given and len(given[0].spec) > MAX_GUIDE_CHARS:
        raise InvalidRequestError(f"{given[0].field}: a constraint of {len(given[0].spec):,} characters, more than "
                                  f"the {MAX_GUIDE_CHARS:,} this server compiles", param=given[0].field)
    return given[0] if given else None


def _guides(prefix: str, schema: dict[str, Any] | str | None, json_object: bool | None, regex: str | None,
            choice: list[str] | None, grammar: str | None) -> list[Guide | None]:
    """vLLM's constraints, by the names after `prefix` ("guided_" or "structured_outputs.") that they have."""
    return [None if schema is None else Guide("json_schema", _json_text(schema), f"{prefix}json"),
            Guide("json_object", "", f"{prefix}json_object") if json_object else None,
            None if regex is None else Guide("regex", regex, f"{prefix}regex"),
            None if choice is None else Guide("choice", json.dumps(choice), f"{prefix}choice"),
            None if grammar is None else Guide("grammar", grammar, f"{prefix}grammar")]


def _response_format_guide(response_format: ResponseFormat | None) -> Guide | None:
    """OpenAI's response_format: text (no constraint), json_object, or json_schema with its schema."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.json_schema is None:
        return Guide("json_object", "", "response_format")
    return Guide("json_schema", _json_text(response_format.json_schema.schema_), "response_format")


def _json_text(schema: dict[str, Any] | str) -> str:
    return schema if isinstance(schema, str) else json.dumps(schema)
