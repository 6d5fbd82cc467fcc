"""The response bodies, as pydantic models for the OpenAPI schema (`/openapi.json`): the routes build these
bodies as dicts (server.serving, server.chat), and the tests check real responses against these models, so
the schema and the answers cannot drift apart unnoticed."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, RootModel


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field the schema does not name fails the tests' check


class ScaleFields(Schema):
    scale_bucket: str | None  # the bank bucket whose scales served the prompt(s); "none": identity
    scale_beyond_largest: bool | None
    scale_method: str | None  # "delta", "a_spectrum", "decimate"; null: no scales


class Logprobs(Schema):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class FinishFields(Schema):
    finish_reason: str | None  # "stop", "length", "abort", "timeout", "error"; null until the choice ends
    stop_reason: str | int | None  # the stop string or stop token id that ended it


class PromptTokenLogprob(Schema):
    logprob: float
    rank: int  # 1: the most likely token at its position
    decoded_token: str


class CompletionChoice(FinishFields):
    index: int
    text: str
    logprobs: Logprobs | None
    # vLLM's, with prompt_logprobs: per prompt token (null for the first), that token and the most likely ones
    # by token id
    prompt_logprobs: list[dict[str, PromptTokenLogprob] | None] | None = None
    # vLLM's, with return_token_ids: the prompt's token ids (streamed: in the choice's first chunk) and the generated
    # ones (streamed: those new in the chunk), the token that ended the choice included
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None
    # several prompts: the choice's own prompt's scale fields
    scale_bucket: str | None = None
    scale_beyond_largest: bool | None = None
    scale_method: str | None = None


class PromptTokensDetails(Schema):
    cached_tokens: int  # prompt tokens a stored prefix state covered (not prefilled)


class Usage(Schema):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None  # with --enable-prefix-caching


class Completion(ScaleFields):
    """A completion, or (with `stream`) each `data:` event of one, whose choices hold the text new in it."""

    id: str
    object: str  # "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None  # streamed: in the last event when stream_options.include_usage, and so far in every
    # event with continuous_usage_stats too


class FunctionCall(Schema):
    name: str
    arguments: str  # JSON


class ToolCall(Schema):
    id: str
    type: str  # "function"
    function: FunctionCall


class FunctionCallDelta(Schema):
    name: str | None = None  # the first chunk of a call
    arguments: str


class ToolCallDelta(Schema):
    index: int
    id: str | None = None  # the first chunk of a call
    type: str | None = None
    function: FunctionCallDelta


class ChatMessageOut(Schema):
    role: str  # "assistant"; without add_generation_prompt, the last message's role
    content: str | None  # null with tool_calls
    tool_calls: list[ToolCall] | None = None  # with tool_choice a function or "required"


class ChatDelta(Schema):
    role: str | None = None  # the first chunk of each choice
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatTokenLogprob(Schema):
    token: str  # its text, or "token_id:<id>" with return_tokens_as_token_ids
    logprob: float
    bytes: list[int]  # the UTF-8 bytes of its text, also those of a character split across tokens


class ChatLogprobEntry(ChatTokenLogprob):
    top_logprobs: list[ChatTokenLogprob]  # the top_logprobs most likely tokens at its position, best first


class ChatLogprobs(Schema):
    content: list[ChatLogprobEntry]  # one per generated token (streamed: the chunk's tokens)


class ChatChoice(FinishFields):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None  # null unless the request set logprobs
    token_ids: list[int] | None = None  # vLLM's, with return_token_ids: the generated tokens, the last one included


class ChatChunkChoice(FinishFields):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    token_ids: list[int] | None = None  # with return_token_ids: those new in the chunk


class ChatCompletion(ScaleFields):
    id: str
    object: str  # "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = None  # vLLM's, with return_token_ids: the rendered prompt's tokens


class ChatCompletionChunk(ScaleFields):
    id: str
    object: str  # "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids: in the stream's first chunk


class ScaleBucket(Schema):
    name: str
    length: int
    method: str
    granularity: str


class ModelCard(Schema):
    id: str
    object: str  # "model"
    created: int
    owned_by: str
    root: str
    arch: str
    quantization: str | None
    max_model_len: int
    training_context_length: int | None
    scale_buckets: list[ScaleBucket]


class ModelList(Schema):
    object: str  # "list"
    data: list[ModelCard]


class Tokenized(Schema):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class Detokenized(Schema):
    prompt: str


class TokenizerInfo(Schema):
    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    chat_template: str | None
    model_max_length: int
    vocab_size: int


class Version(Schema):
    version: str


class Health(Schema):
    status: str  # "ok"


class ErrorDetail(Schema):
    message: str
    type: str
    param: str | None
    code: str | None


class Error(Schema):
    error: ErrorDetail


class OutputText(Schema):
    type: str  # "output_text"
    text: str
    annotations: list[dict]  # always empty: this server cites nothing
    logprobs: list[dict]  # always empty (logprobs are served on /v1/chat/completions)


class OutputMessage(Schema):
    type: str  # "message"
    id: str
    status: str  # "in_progress", "completed", "incomplete"
    role: str  # "assistant"
    content: list[OutputText]


class InputTokensDetails(Schema):
    cached_tokens: int  # prompt tokens a stored prefix state covered (0 without --enable-prefix-caching)


class OutputTokensDetails(Schema):
    reasoning_tokens: int  # 0: no reasoning model


class ResponseUsage(Schema):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(Schema):
    reason: str  # "max_output_tokens"


class ResponseError(Schema):
    code: str
    message: str


class ResponseObject(ScaleFields):
    """A response of the Responses API (nothing is stored: `store` is false whatever the request said)."""

    id: str
    object: str  # "response"
    created_at: int
    status: str  # "in_progress" (stream events before the end), "completed", "incomplete", "failed"
    error: ResponseError | None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputMessage]
    parallel_tool_calls: bool
    previous_response_id: str | None
    store: bool
    temperature: float | None
    top_p: float | None
    text: dict  # the request's text setting: {"format": {"type": ...}}
    tool_choice: str  # "none"
    tools: list[dict]  # empty
    metadata: dict[str, str]
    usage: ResponseUsage | None  # null until the response is done


class ResponseStreamEvent(Schema):
    """One event of a streamed response: `type` says which fields it has, as OpenAI's events do."""

    type: str  # "response.created", "response.output_text.delta", ..., "response.completed" or "response.failed"
    sequence_number: int
    response: ResponseObject | None = None
    output_index: int | None = None
    item: OutputMessage | None = None
    item_id: str | None = None
    content_index: int | None = None
    part: OutputText | None = None
    delta: str | None = None
    text: str | None = None
    logprobs: list[dict] | None = None


class Invocation(RootModel[Completion | ChatCompletion | ResponseObject]):
    """The answer to /invocations: the answer of the route its body went to."""
