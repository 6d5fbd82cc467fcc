"""Chat completions: the messages rendered to one prompt by the model's chat template, generated as a completion
(server.serving), and shaped as OpenAI chat completion objects and chunks."""

from __future__ import annotations

from starlette.requests import Request as HttpRequest

from .chat_template import TemplateRenderError, TokenizerConfig
from .errors import InvalidRequestError
from .protocol import ChatCompletionRequest, ChatMessage
from .request import RequestOutput
from .serving import Choice, ChoiceResult, CompletionService, Submission, UsageChunks, finish_fields

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


class ChatService:
    def __init__(self, completions: CompletionService, tokenizer_config: TokenizerConfig):
        self.completions = completions
        self.tokenizer_config = tokenizer_config

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool, variables: dict | None = None) -> str:
        """The prompt of `messages`; InvalidRequestError when there is no template or it refuses them."""
        template = self.tokenizer_config.chat_template
        if template is None:
            raise InvalidRequestError(NO_TEMPLATE, param="messages", code="no_chat_template")
        try:
            return template.render([message_variables(m) for m in messages], add_generation_prompt,
                                   {**self.tokenizer_config.special_tokens, **(variables or {})})
        except TemplateRenderError as bad:
            raise InvalidRequestError(f"the chat template ({template.origin}) refused the messages: {bad}",
                                      param="messages") from None

    async def submit(self, body: ChatCompletionRequest, request_id: str) -> Submission:
        for name in ("logprobs", "echo"):
            if getattr(body, name):
                raise InvalidRequestError(f"{name} is not served on chat completions; /v1/completions serves it",
                                          param=name)
        self.completions.check_model(body.model)
        prompts = await self.completions.prompts(self.render(body.messages, body.add_generation_prompt,
                                                             body.chat_template_kwargs), body.truncate_prompt_tokens)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await self.completions.submit(body.model_copy(update={"max_tokens": max_tokens}), prompts, request_id,
                                             default_max_tokens=self._default_max_tokens(len(prompts[0].ids)),
                                             id_prefix="chatcmpl")

    def _default_max_tokens(self, prompt_tokens: int) -> int:
        """A turn without max_tokens may run to the model's training length, past which it was never trained
        (vLLM lets it run to the context limit, which here would also pick the largest scale bucket)."""
        training = self.completions.training_length
        return DEFAULT_MAX_TOKENS if training is None else max(training - prompt_tokens, DEFAULT_MAX_TOKENS)

    async def complete(self, submission: Submission, http_request: HttpRequest) -> dict | None:
        return await self.completions.complete(submission, http_request, "chat.completion", _message_choice)

    def stream(self, submission: Submission, usage_chunks: UsageChunks):
        return self.completions.stream(submission, usage_chunks, "chat.completion.chunk", _delta_choice)


def _message_choice(_submission: Submission, result: ChoiceResult) -> dict:
    return {"index": result.choice.index, "message": {"role": "assistant", "content": result.final.text},
            "logprobs": None, **finish_fields(result.final)}


def _delta_choice(_submission: Submission, choice: Choice, output: RequestOutput, first: bool) -> dict:
    delta = {"role": "assistant", "content": output.text} if first else {"content": output.text}
    return {"index": choice.index, "delta": delta, "logprobs": None, **finish_fields(output)}
