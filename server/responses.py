"""OpenAI's Responses API (`/v1/responses`) as vLLM serves it without storing responses: the input turned into
chat messages (server.chat renders and generates them as a chat completion of one choice), the result shaped as a
response object, or streamed as the API's typed events."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator

from starlette.requests import Request as HttpRequest

from .chat import ChatService, ChatSubmission
from .errors import InvalidRequestError, ServerError
from .protocol import ChatCompletionRequest, ChatMessage, ResponseFormat, ResponsesRequest, SamplingFields
from .request import RequestOutput, RequestStatus
from .serving import ChoiceResult, shared_scale_fields, usage

ROLES = {"developer": "system"}  # OpenAI's newer name for the system role, which chat templates know as system


def chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion that generates `body`'s response: `instructions` as a system message before the input
    (a string: one user message), text.format as its response_format."""
    messages = [] if body.instructions is None else [ChatMessage(role="system", content=body.instructions)]
    if isinstance(body.input, str):
        messages.append(ChatMessage(role="user", content=body.input))
    else:
        messages += [ChatMessage(role=ROLES.get(m.role, m.role), content=m.content if isinstance(m.content, str)
                                 else "\n".join(part.text for part in m.content)) for m in body.input]
    if not messages:
        raise InvalidRequestError("input holds no message", param="input")
    text_format = body.text.format
    response_format = body.response_format
    if text_format.type != "text":
        if response_format is not None:
            raise InvalidRequestError("give text.format or response_format, not both", param="text")
        response_format = ResponseFormat.model_validate({"type": text_format.type, **(
            {"json_schema": {"name": text_format.name, "schema": text_format.schema_, "strict": text_format.strict}}
            if text_format.type == "json_schema" else {})})
    sampling = {name: getattr(body, name) for name in SamplingFields.model_fields}
    max_tokens = body.max_output_tokens if body.max_output_tokens is not None else body.max_tokens
    return ChatCompletionRequest.model_construct(**{**sampling, "max_tokens": max_tokens, "stream": False,
                                                    "response_format": response_format}, messages=messages)


class ResponsesService:
    def __init__(self, chat: ChatService):
        self.chat = chat
        self.completions = chat.completions

    async def submit(self, body: ResponsesRequest, request_id: str) -> ChatSubmission:
        try:
            return await self.chat.submit(chat_request(body), request_id, id_prefix="resp")
        except InvalidRequestError as bad:  # the chat's faults of its messages are this request's of its input
            if bad.param != "messages":
                raise
            raise InvalidRequestError(bad.message, param="input", code=bad.code) from None

    async def complete(self, body: ResponsesRequest, submission: ChatSubmission,
                       http_request: HttpRequest) -> dict | None:
        """The whole response object; None when the client went away first."""
        results = await self.completions.collect_or_abort(submission, http_request)
        return None if results is None else self._response(body, submission, results)

    async def stream(self, body: ResponsesRequest, submission: ChatSubmission) -> AsyncIterator[bytes]:
        """The API's events: the response created and in progress, its message and text part added, a text delta
        whenever tokens come (several a delta when the client falls behind), then the text, part and message
        done and the response completed; `response.failed` instead when the engine fails the request."""
        numbers = itertools.count()
        item_id = message_id(submission)

        def event(kind: str, **fields) -> bytes:
            body_ = {"type": kind, "sequence_number": next(numbers), **fields}
            return f"event: {kind}\ndata: {json.dumps(body_, ensure_ascii=False)}\n\n".encode()

        [choice] = submission.choices
        result = ChoiceResult(choice)
        started = self._response(body, submission, [])
        yield event("response.created", response=started) + event("response.in_progress", response=started)
        at = {"output_index": 0, "item_id": item_id, "content_index": 0}
        yield (event("response.output_item.added", output_index=0, item=message_item(item_id, "", None))
               + event("response.content_part.added", **at, part=output_text("")))
        try:
            async for taken in self.completions.outputs(submission):
                deltas = []
                for _, output in taken:
                    result.add(output)
                    if output.text:
                        deltas.append(event("response.output_text.delta", **at, delta=output.text, logprobs=[]))
                if deltas:
                    yield b"".join(deltas)
        except ServerError as bad:
            error = bad.to_json()["error"]
            failed = {**started, "status": "failed",
                      "error": {"code": error["code"] or error["type"], "message": error["message"]}}
            yield event("response.failed", response=failed)
            return
        done = self._response(body, submission, [result])
        [item] = done["output"]
        text = result.final.text
        yield (event("response.output_text.done", **at, text=text, logprobs=[])
               + event("response.content_part.done", **at, part=output_text(text))
               + event("response.output_item.done", output_index=0, item=item)
               + event("response.completed", response=done))

    def _response(self, body: ResponsesRequest, submission: ChatSubmission, results: list[ChoiceResult]) -> dict:
        """The response object of `results` (none yet: in progress, no output, no usage)."""
        final = results[0].final if results else None
        status = status_of(final)
        params = submission.choices[0].request.params  # the sampling served, the generation config's defaults too
        return {
            "id": submission.id, "object": "response", "created_at": submission.created, "status": status,
            "error": None, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "model": self.completions.http.served_model_name,
            "output": [] if final is None else [message_item(message_id(submission), final.text, final)],
            "parallel_tool_calls": False, "previous_response_id": None, "store": False,
            "temperature": params.temperature, "top_p": params.top_p,
            "text": {"format": body.text.format.model_dump(by_alias=True, exclude_none=True)},
            "tool_choice": "none", "tools": [], "metadata": body.metadata or {},
            "usage": None if final is None else self._usage(submission, results),
            **shared_scale_fields(submission),
        }

    def _usage(self, submission: ChatSubmission, results: list[ChoiceResult]) -> dict:
        counts = usage(submission, results, cached=True)
        return {"input_tokens": counts["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": counts["prompt_tokens_details"]["cached_tokens"]},
                "output_tokens": counts["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": counts["total_tokens"]}


def message_id(submission: ChatSubmission) -> str:
    return "msg-" + submission.id.removeprefix("resp-")


def output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str, final: RequestOutput | None) -> dict:
    """The response's one output item: the assistant's message (in progress until `final`, its last output)."""
    return {"type": "message", "id": item_id, "status": status_of(final), "role": "assistant",
            "content": [] if final is None else [output_text(text)]}


def status_of(final: RequestOutput | None) -> str:
    """A response's status, and its message's, from the last output: in progress until there is one, incomplete
    when max_output_tokens cut it short, else completed."""
    if final is None:
        return "in_progress"
    return "incomplete" if final.status is RequestStatus.FINISHED_LENGTH else "completed"
