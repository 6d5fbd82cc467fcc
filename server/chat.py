"""Chat completions: the messages rendered to one prompt by the model's chat template, generated as a completion
(server.serving), and shaped as OpenAI chat completion objects and chunks."""

from __future__ import annotations

from dataclasses import dataclass, fields

from starlette.requests import Request as HttpRequest

from .chat_template import TemplateRenderError, TokenizerConfig
from .errors import InvalidRequestError
from .protocol import ChatCompletionRequest, ChatMessage
from .request import RequestOutput
from .serving import Choice, ChoiceResult, CompletionService, Submission, UsageChunks, finish_fields
from .tools import ToolCalling, tool_calling, tool_calls

NO_TEMPLATE = ("this model has no chat template (its directory's tokenizer_config.json has no chat_template): "
               "start the server with --chat-template FILE, a jinja2 chat template as transformers uses, or send "
               "the text yourself to /v1/completions")
DEFAULT_MAX_TOKENS = 16  # where the model's training length is unknown (as completions default)


def message_variables(message: ChatMessage) -> dict:
    """A message as templates read it: text parts joined by newlines (as vLLM joins them for text templates)."""
    fields = message.model_dump(exclude_none=True)
    if isinstance(message.content, list):
        fields["content"] = "\n".join(part.text for part in message.content)
    return fields


def template_variables(body: ChatCompletionRequest) -> dict:
    """The chat template's variables beyond the messages and add_generation_prompt, as vLLM gives them: the
    request's chat_template_kwargs, its tools and its documents."""
    return {**(body.chat_template_kwargs or {}),
            **({"tools": [tool.model_dump(exclude_none=True) for tool in body.tools]} if body.tools else {}),
            **({"documents": body.documents} if body.documents is not None else {})}


@dataclass
class ChatSubmission(Submission):
    """A chat request in the engine: its choices answer in `role`, each one's text starting with `echoed`, or
    as tool calls."""

    role: str = "assistant"
    echoed: str = ""
    logprobs: bool = False
    tools: ToolCalling | None = None

    def call_id(self, choice: Choice) -> str:
        return f"call-{self.id.removeprefix('chatcmpl-')}-{choice.index}"


class ChatService:
    def __init__(self, completions: CompletionService, tokenizer_config: TokenizerConfig):
        self.completions = completions
        self.tokenizer_config = tokenizer_config

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool, variables: dict | None = None,
               continue_final_message: bool = False) -> str:
        """The prompt of `messages`; with `continue_final_message`, cut just after the last message's text (as
        transformers cuts it: its turn left open). InvalidRequestError when there is no template, it refuses them,
        or it does not put that text in the prompt."""
        template = self.tokenizer_config.chat_template
        if template is None:
            raise InvalidRequestError(NO_TEMPLATE, param="messages", code="no_chat_template")
        try:
            rendered = template.render([message_variables(m) for m in messages], add_generation_prompt,
                                       {**self.tokenizer_config.special_tokens, **(variables or {})})
        except TemplateRenderError as bad:
            raise InvalidRequestError(f"the chat template ({template.origin}) refused the messages: {bad}",
                                      param="messages") from None
        if not continue_final_message:
            return rendered
        final = message_variables(messages[-1]).get("content", "").strip()
        if final not in rendered:
            raise InvalidRequestError(f"continue_final_message: the chat template ({template.origin}) does not put "
                                      "the last message's text in the prompt, so it cannot be continued",
                                      param="continue_final_message")
        return rendered[:rendered.rindex(final) + len(final)]

    async def submit(self, body: ChatCompletionRequest, request_id: str, id_prefix: str = "chatcmpl") -> ChatSubmission:
        if body.top_logprobs and not body.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
        if body.prompt_logprobs is not None:
            raise InvalidRequestError("prompt_logprobs is served on /v1/completions (send the rendered prompt: "
                                      "/tokenize gives its tokens)", param="prompt_logprobs")
        self.completions.check_model(body.model)
        calling = tool_calling(body)
        prompts = await self.completions.prompts(
            self.render(body.messages, body.add_generation_prompt, template_variables(body),
                        body.continue_final_message),
            body.truncate_prompt_tokens)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        submission = await self.completions.submit(
            body.model_copy(update={"max_tokens": max_tokens}), prompts, request_id,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            default_max_tokens=self._default_max_tokens(len(prompts[0].ids)), id_prefix=id_prefix,
            guide=None if calling is None else calling.guide)
        # as vLLM: a reply continues the last message's role when no generation prompt opens the assistant's turn,
        # and echo starts it with that message's text
        last = body.messages[-1]
        role = "assistant" if body.add_generation_prompt else last.role
        echoed = message_variables(last).get("content", "") if body.echo and last.role == role else ""
        return ChatSubmission(**{f.name: getattr(submission, f.name) for f in fields(Submission)}, role=role,
                              echoed=echoed, logprobs=body.logprobs, tools=calling)

    def _default_max_tokens(self, prompt_tokens: int) -> int:
        """A turn without max_tokens runs to the generation config's max_new_tokens or else to the model's
        training length, past which it was never trained (vLLM lets it run to the context limit, which here would
        also pick the largest scale bucket)."""
        if self.completions.generation.max_tokens is not None:
            return self.completions.generation.max_tokens
        training = self.completions.training_length
        return DEFAULT_MAX_TOKENS if training is None else max(training - prompt_tokens, DEFAULT_MAX_TOKENS)

    async def complete(self, submission: Submission, http_request: HttpRequest) -> dict | None:
        response = await self.completions.complete(submission, http_request, "chat.completion", self._message_choice)
        return response if response is None else {**response, **self._prompt_token_ids(submission)}

    def stream(self, submission: Submission, usage_chunks: UsageChunks):
        return self.completions.stream(submission, usage_chunks, "chat.completion.chunk", self._delta_choice,
                                       opening=self._prompt_token_ids(submission))

    @staticmethod
    def _prompt_token_ids(submission: Submission) -> dict:
        """vLLM's return_token_ids: a chat's rendered prompt's token ids, beside its choices."""
        return {"prompt_token_ids": submission.prompts[0].ids} if submission.token_ids else {}

    def _message_choice(self, submission: Submission, result: ChoiceResult) -> dict:
        chat = _chat(submission)
        text = result.final.text
        calls = None if chat.tools is None else tool_calls(chat.tools, text, chat.call_id(result.choice))
        message: dict
        if calls is None:  # a reply in text, or one cut short of its tool calls' JSON
            message = {"role": chat.role, "content": chat.echoed + text}
        else:
            message = {"role": chat.role, "content": None, "tool_calls": calls}
        return {"index": result.choice.index, "message": message, "logprobs": self._logprobs(chat, result.final),
                **finish_fields(result.final), **({"token_ids": result.final.token_ids} if chat.token_ids else {})}

    def _delta_choice(self, submission: Submission, result: ChoiceResult, output: RequestOutput, first: bool) -> dict:
        chat = _chat(submission)
        if chat.tools is not None:
            delta = self._tool_delta(chat, result, output, first)
        else:
            delta = {"content": chat.echoed + output.text if first else output.text}
        delta = {"role": chat.role, **delta} if first else delta
        return {"index": result.choice.index, "delta": delta, "logprobs": self._logprobs(chat, output),
                **finish_fields(output), **({"token_ids": output.token_ids} if chat.token_ids else {})}

    @staticmethod
    def _tool_delta(chat: ChatSubmission, result: ChoiceResult, output: RequestOutput, first: bool) -> dict:
        """A chunk of tool calls: a named call's arguments as they come (its id and name in the first); a
        required array's calls all at its end, once its JSON (the choice's whole text) is complete."""
        assert chat.tools is not None, "a chat with tool calls"
        if chat.tools.name is not None:
            if not first:
                return {"tool_calls": [{"index": 0, "function": {"arguments": output.text}}]}
            return {"tool_calls": [{"index": 0, "id": f"{chat.call_id(result.choice)}-0", "type": "function",
                                    "function": {"name": chat.tools.name, "arguments": output.text}}]}
        if not output.finished:
            return {}
        text = result.final.text
        calls = tool_calls(chat.tools, text, chat.call_id(result.choice))
        if calls is None:
            return {"content": text}
        return {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}

    def _logprobs(self, chat: ChatSubmission, output: RequestOutput) -> dict | None:
        """The logprobs of the tokens of `output`, when the request asked for them."""
        if not chat.logprobs:
            return None
        return self.completions.chat_logprobs_json(output.token_ids, output.logprobs, chat.tokens_as_ids)


def _chat(submission: Submission) -> ChatSubmission:
    assert isinstance(submission, ChatSubmission), "chat choices are made of chat submissions"
    return submission
