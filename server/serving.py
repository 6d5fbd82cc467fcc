"""Completions, between the HTTP routes and the engine: validate a request against the model, choose its
scale bucket, submit it, and turn the engine's outputs into OpenAI completion objects or stream chunks."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from scale_bank import Selection, UnknownBucketError, select
from starlette.requests import Request as HttpRequest

from .components import Components
from .config import HttpConfig
from .detokenizer import OutputText
from .engine import Engine
from .errors import (EngineFailure, InvalidRequestError, ModelNotFoundError, PromptTooLongError, ServerError,
                     UnavailableError)
from .protocol import CompletionRequest
from .request import FINISH_REASON, Request, RequestOutput, RequestStatus, SamplingParams, TokenLogprob


@dataclass
class Submission:
    """A request in the engine and the queue its outputs arrive on (from the engine thread)."""

    request: Request
    outputs: asyncio.Queue[RequestOutput]
    prompt_text: str  # what echo puts before the completion
    echo: bool
    selection: Selection
    created: int  # unix time, for the response objects


class CompletionService:
    def __init__(self, engine: Engine, components: Components, http: HttpConfig, request_timeout: float | None):
        self.engine = engine
        self.tokenizer = components.tokenizer
        self.bank = components.bank
        self.training_length = components.training_length
        self.decimations = components.decimations
        self.http = http
        self.request_timeout = request_timeout

    # --- admission -----------------------------------------------------------------------------------

    async def submit(self, body: CompletionRequest) -> Submission:
        """Validates `body`, picks its bucket and queues it. Raises a ServerError (4xx) on any fault."""
        if body.model is not None and body.model != self.http.served_model_name:
            raise ModelNotFoundError(f"model {body.model!r} does not exist; this server serves "
                                     f"{self.http.served_model_name!r}", param="model")
        if body.n != 1:
            raise InvalidRequestError(f"n must be 1, got {body.n}", param="n")
        prompt_ids, prompt_text = await self._prompt(body.prompt)
        params = SamplingParams(
            max_tokens=16 if body.max_tokens is None else body.max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            seed=body.seed,
            stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
            logprobs=body.logprobs,
            prompt_logprobs=body.echo and body.logprobs is not None,
        )
        limit = self.http.max_context
        n_tokens = len(prompt_ids) + params.max_tokens
        if n_tokens > limit:
            raise InvalidRequestError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = "
                                      f"{n_tokens} exceeds the context limit of {limit} tokens", param="max_tokens",
                                      code="context_length_exceeded")
        try:
            selection = select(self.bank, n_tokens, body.scale_bucket, self.training_length)
        except UnknownBucketError as bad:
            raise InvalidRequestError(str(bad), param="scale_bucket", code="unknown_scale_bucket") from None
        decimation = self.decimations[selection.name] if selection.method == "decimate" else None
        if decimation is not None and params.prompt_logprobs:
            raise InvalidRequestError(f"bucket {selection.name} decimates the prompt (drops positions in one layer), "
                                      "so it has no logprobs of the prompt's tokens: ask for echo with logprobs "
                                      "with scale_bucket 'none' or a bucket of another method", param="scale_bucket",
                                      code="decimated_prompt_logprobs")
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def sink(output: RequestOutput) -> None:  # runs on the engine thread
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, output)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

        request = Request(f"cmpl-{uuid.uuid4().hex}", prompt_ids, params, selection.scales, selection.name,
                          OutputText(self.tokenizer, params.stop), sink, self.request_timeout, decimation=decimation)
        self.engine.submit(request)
        return Submission(request, outputs, prompt_text, body.echo, selection, int(time.time()))

    async def _prompt(self, prompt) -> tuple[list[int], str]:
        """Token ids and text of the prompt: a string, token ids, or a list of exactly one of those. Its length
        is judged as soon as it is known: token ids before anything else, text once tokenised.

        Text is tokenised on a worker thread through `encode_batch`, which releases the GIL (`encode` holds it),
        so a long prompt does not stall the event loop and every other client. No bound on the token count is
        drawn from the text's length before that: a token may span many characters and a tokenizer's normaliser
        may shorten the text, so only the body size limit bounds this work."""
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise InvalidRequestError(f"one prompt per request, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty", param="prompt")
            [ids] = await asyncio.to_thread(self.tokenizer.encode_batch, [prompt])
            if not ids:
                raise InvalidRequestError("the prompt encodes to no tokens", param="prompt")
            self._check_length(ids)
            return ids, prompt
        if not prompt:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        self._check_length(prompt)
        vocab = self.tokenizer.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary (0 … {vocab - 1})", param="prompt")
        return prompt, self.tokenizer.decode(prompt)

    def _check_length(self, prompt_ids: list[int]) -> None:
        limit = self.http.max_context
        if len(prompt_ids) > limit:
            raise PromptTooLongError(f"the prompt has {len(prompt_ids)} tokens, more than this server's context "
                                     f"limit of {limit} (--max-context)", param="prompt")

    # --- outputs -------------------------------------------------------------------------------------

    async def _outputs(self, submission: Submission) -> AsyncIterator[RequestOutput]:
        """The request's outputs up to its last; a finished request with no usable result raises ServerError.
        Leaving early (client gone, cancellation) aborts the request and frees its slot."""
        try:
            while True:
                output = await submission.outputs.get()
                _raise_for(output)
                yield output
                if output.finished:
                    return
        finally:
            self.engine.abort(submission.request)  # no-op when finished

    async def complete(self, submission: Submission, http_request: HttpRequest) -> dict | None:
        """The whole completion object; None when the client went away first (the request is then aborted)."""
        collect = asyncio.ensure_future(self._collect(submission))
        gone = asyncio.ensure_future(_disconnected(http_request))
        try:
            done, _ = await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
            return collect.result() if collect in done else None
        finally:
            gone.cancel()
            collect.cancel()
            self.engine.abort(submission.request)

    async def _collect(self, submission: Submission) -> dict:
        text, token_ids, logprobs, prompt_logprobs, last = "", [], [], None, None
        async for output in self._outputs(submission):
            text += output.text
            token_ids += output.token_ids
            logprobs += output.logprobs
            prompt_logprobs = output.prompt_logprobs or prompt_logprobs
            last = output
        body = self._chunk(submission, text, token_ids, logprobs, prompt_logprobs, FINISH_REASON[last.status], True)
        body["usage"] = _usage(last)
        return body

    async def stream(self, submission: Submission, include_usage: bool) -> AsyncIterator[dict]:
        """SSE events: one chunk per engine output, a usage chunk when asked, then [DONE]. An error after the
        stream began is sent as an {"error": ...} event."""
        first, last = True, None
        try:
            async for output in self._outputs(submission):
                reason = FINISH_REASON[output.status] if output.finished else None
                chunk = self._chunk(submission, output.text, output.token_ids, output.logprobs, output.prompt_logprobs,
                                    reason, first)
                yield {"data": json.dumps(chunk, ensure_ascii=False)}
                first, last = False, output
        except ServerError as bad:
            yield {"data": json.dumps(bad.to_json(), ensure_ascii=False)}
        else:
            if include_usage:
                usage = {**self._chunk(submission, "", [], [], None, None, False), "choices": [], "usage": _usage(last)}
                yield {"data": json.dumps(usage, ensure_ascii=False)}
        yield {"data": "[DONE]"}

    def _chunk(self, submission: Submission, text: str, token_ids: list[int], logprobs: list[TokenLogprob],
               prompt_logprobs: list[TokenLogprob | None] | None, finish_reason: str | None, echo: bool) -> dict:
        """A completion object (or stream chunk). With `echo` (and the request's echo) the prompt goes first."""
        request = submission.request
        prefix = submission.prompt_text if echo and submission.echo else ""
        choice = {"index": 0, "text": prefix + text, "logprobs": None, "finish_reason": finish_reason}
        if request.params.logprobs is not None:
            ids, entries = token_ids, logprobs
            if prefix and prompt_logprobs is not None:
                ids, entries = request.prompt_ids + token_ids, prompt_logprobs + logprobs
            choice["logprobs"] = self._logprobs_json(ids, entries)
        selection = submission.selection
        return {"id": request.request_id, "object": "text_completion", "created": submission.created,
                "model": self.http.served_model_name, "choices": [choice],
                "scale_bucket": selection.name, "scale_beyond_largest": selection.beyond_largest,
                "scale_method": selection.method}

    def _logprobs_json(self, token_ids: list[int], entries: list[TokenLogprob | None]) -> dict:
        """OpenAI's legacy logprobs object; text offsets count from the start of this choice's text."""
        tokens = [self.tokenizer.decode([t]) for t in token_ids]
        offsets, position = [], 0
        for token in tokens:
            offsets.append(position)
            position += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": [None if e is None else {self.tokenizer.decode([i]): lp for i, lp in e.top} for e in entries],
            "text_offset": offsets,
        }


def _raise_for(output: RequestOutput) -> None:
    if output.status is RequestStatus.FINISHED_TIMEOUT:
        raise UnavailableError("the request ran past the server's --request-timeout", code="request_timeout")
    if output.status is RequestStatus.FINISHED_ERROR:
        raise EngineFailure(output.error or "the engine failed on this request")
    if output.status is RequestStatus.FINISHED_ABORTED:
        raise UnavailableError("the request was cancelled", code="aborted")


def _usage(last: RequestOutput) -> dict:
    return {"prompt_tokens": last.num_prompt_tokens, "completion_tokens": last.num_output_tokens,
            "total_tokens": last.num_prompt_tokens + last.num_output_tokens}


async def _disconnected(http_request: HttpRequest) -> None:
    """Returns when the client closes the connection (the body has been read, so only that message is left)."""
    while (await http_request.receive())["type"] != "http.disconnect":
        pass
