"""Completions, between the HTTP routes and the engine: validate a request against the model, choose its
scale bucket, submit it, and turn the engine's outputs into OpenAI completion objects or stream chunks."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from runtime.tokenizer import Tokenizer
from scale_bank import Selection, UnknownBucketError, select
from starlette.requests import Request as HttpRequest

from .components import Components
from .config import EngineConfig, HttpConfig
from .engine_pool import Engines
from .engine_protocol import EngineRequest
from .errors import (EngineFailure, InvalidRequestError, ModelNotFoundError, PromptTooLongError, ServerError,
                     UnavailableError)
from .generation_defaults import SAMPLING_FIELDS
from .guided import Guide, Guides
from .mailbox import Doorbell, Mailbox
from .protocol import SamplingFields, guide_of
from .request import FINISH_REASON, RequestOutput, RequestStatus, SamplingParams, TokenLogprob

log = logging.getLogger(__name__)
T = TypeVar("T")
SSE_DONE = b"data: [DONE]\n\n"  # the stream's last event, as OpenAI ends one


@dataclass
class Prompt:
    ids: list[int]
    text: str | None  # as the request gave it, what echo puts before the completion; None: it gave token ids

    def echoed(self, tokenizer: Tokenizer) -> str:
        """What echo puts before the completion: token ids are decoded only when asked (a request without echo
        would pay for decoding a long prompt on the event loop)."""
        return tokenizer.decode(self.ids) if self.text is None else self.text


@dataclass(frozen=True)
class UsageChunks:
    """Where a stream reports usage (OpenAI's stream_options): in a last chunk of its own, and (vLLM's
    continuous_usage_stats) so far in every chunk."""

    final: bool = False
    continuous: bool = False


@dataclass
class Choice:
    """One sample of one prompt: choice `index` is prompt i's sample j at i × n + j, as OpenAI and vLLM number them."""

    index: int
    request: EngineRequest
    prompt: Prompt
    selection: Selection


@dataclass
class Submission:
    """A client request in the engine (one engine request per choice) and the mailbox their outputs arrive in,
    each with its choice's index."""

    id: str
    prompts: list[Prompt]
    choices: list[Choice]  # in index order
    outputs: Mailbox
    echo: bool
    created: int  # unix time, for the response objects
    tokens_as_ids: bool = False  # logprobs name tokens "token_id:<id>" (vLLM's return_tokens_as_token_ids)
    token_ids: bool = False  # the prompt's and the generated token ids shown too (vLLM's return_token_ids)
    prompt_logprobs: int | None = None  # each choice shows its prompt's logprobs with this many alternatives

    @property
    def requests(self) -> list[EngineRequest]:
        return [choice.request for choice in self.choices]

    @property
    def num_prompt_tokens(self) -> int:
        """Each prompt counted once, however many samples it has (as vLLM counts them)."""
        return sum(len(prompt.ids) for prompt in self.prompts)


class CompletionService:
    def __init__(self, engine: Engines, components: Components, http: HttpConfig, engine_config: EngineConfig):
        self.engine = engine
        self.tokenizer = components.tokenizer
        self.bank = components.bank
        self.training_length = components.training_length
        self.http = http
        self.engine_config = engine_config
        self.generation = components.generation
        self.guides = Guides(components.tokenizer)  # compiles each request's constraint once, to refuse a bad one
        self._doorbells: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Doorbell] = weakref.WeakKeyDictionary()

    # --- admission -----------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.http.served_model_name:
            raise ModelNotFoundError(f"model {model!r} does not exist; this server serves "
                                     f"{self.http.served_model_name!r}", param="model")

    async def submit(self, body: SamplingFields, prompts: list[Prompt], request_id: str, *, echo: bool = False,
                     logprobs: int | None = None, prompt_logprobs: int | None = None, default_max_tokens: int = 16,
                     id_prefix: str = "cmpl", guide: Guide | None = None) -> Submission:
        """Validates the request, picks each prompt's bucket and queues `body.n` samples of every prompt (all
        or none). Raises a ServerError (4xx) on any fault."""
        self.check_model(body.model)
        if body.best_of is not None and body.best_of != body.n:
            raise InvalidRequestError(f"best_of ({body.best_of}) must equal n ({body.n}): every sample drawn is "
                                      "returned, none is held back", param="best_of")
        slots = self.engine_config.slots
        if body.n > slots:
            raise InvalidRequestError(f"n ({body.n}) is more than this server's state slots ({slots}, "
                                      "--max-batch-size): the samples of a prompt start together", param="n")
        if len(prompts) > self.engine_config.max_queue:
            raise InvalidRequestError(f"{len(prompts)} prompts, more than this server queues at once "
                                      f"({self.engine_config.max_queue}, --max-queue)", param="prompt")
        if prompt_logprobs is not None and body.stream:
            raise InvalidRequestError("prompt_logprobs are not served on a stream (as in vLLM): ask without stream",
                                      param="prompt_logprobs")
        given = guide_of(body)
        if guide is not None and given is not None:
            raise InvalidRequestError(f"a tool call is held to its function's schema: {given.field} cannot be given "
                                      "with it", param=given.field)
        guide = guide or given
        params = replace(self._params(body, logprobs, echo, default_max_tokens, prompt_logprobs), guide=guide)
        selections = [self._bucket(prompt.ids, params, body.scale_bucket) for prompt in prompts]
        if guide is not None:  # once the rest holds; compiled (and cached) off the event loop: a schema takes a while
            await asyncio.wrap_future(self.guides.compile_soon(guide))
        outputs = Mailbox(self._doorbell())
        completion_id = f"{id_prefix}-{request_id}"
        several = len(prompts) * body.n > 1
        choices, requests, sinks = [], [], {}
        for i, (prompt, selection) in enumerate(zip(prompts, selections)):
            group = []
            for j in range(body.n):
                index = i * body.n + j
                seeded = params if params.seed is None else replace(params, seed=params.seed + j)  # as vLLM seeds
                group.append(EngineRequest(f"{completion_id}-{index}" if several else completion_id, prompt.ids,
                                           seeded, selection.name, self.engine_config.request_timeout,
                                           selection.extension.decimation is not None))
                sinks[group[-1].request_id] = outputs.sink(index)
                choices.append(Choice(index, group[-1], prompt, selection))
            group[0].forks = group[1:]
            for fork in group[1:]:  # the same deadline: the forks cannot outlive the request they copy
                fork.arrival_time = group[0].arrival_time
            requests.append(group[0])
        await self.engine.submit(requests, sinks)
        if self.http.log_requests:
            log.info("%s: %d prompt(s), n=%d, max_tokens %d", completion_id, len(prompts), body.n, params.max_tokens)
        return Submission(completion_id, prompts, choices, outputs, echo, int(time.time()),
                          tokens_as_ids=body.return_tokens_as_token_ids, token_ids=bool(body.return_token_ids),
                          prompt_logprobs=prompt_logprobs)

    def _doorbell(self) -> Doorbell:
        """The running event loop's doorbell: one for all its submissions, so that one engine step wakes it once."""
        loop = asyncio.get_running_loop()
        if loop not in self._doorbells:
            self._doorbells[loop] = Doorbell(loop)
        return self._doorbells[loop]

    def _params(self, body: SamplingFields, logprobs: int | None, echo: bool, default_max_tokens: int,
                prompt_logprobs: int | None) -> SamplingParams:
        vocab = self.tokenizer.vocab_size
        bias = tuple((int(token), value) for token, value in (body.logit_bias or {}).items())
        for name, ids in (("logit_bias", [t for t, _ in bias]), ("stop_token_ids", body.stop_token_ids or []),
                          ("allowed_token_ids", body.allowed_token_ids or [])):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary (0 … {vocab - 1})",
                                          param=name)
        max_tokens = default_max_tokens if body.max_tokens is None else body.max_tokens
        if self.generation.max_tokens_cap is not None:
            max_tokens = min(max_tokens, self.generation.max_tokens_cap)
        if body.min_tokens > max_tokens:
            raise InvalidRequestError(f"min_tokens ({body.min_tokens}) is more than max_tokens ({max_tokens})",
                                      param="min_tokens")
        bad_words = self._bad_word_ids(body.bad_words or [])
        stop_token_ids = self._stop_token_ids(body)
        self._check_some_token_allowed(body, bad_words, stop_token_ids)
        default = self.generation.sampling
        given = {name: value if (value := getattr(body, name)) is not None else default.get(name)
                 for name in SAMPLING_FIELDS}
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if given["temperature"] is None else given["temperature"],
            top_p=1.0 if given["top_p"] is None else given["top_p"],
            top_k=int(given["top_k"] or 0),
            seed=body.seed,
            stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
            logprobs=logprobs,
            # the prompt is scored for echo with logprobs and for prompt_logprobs, with the alternatives of either
            prompt_logprobs=max((k for k in (logprobs if echo else None, prompt_logprobs) if k is not None),
                                default=None),
            min_p=given["min_p"] or 0.0,
            stop_token_ids=stop_token_ids,
            ignore_eos=body.ignore_eos,
            include_stop_str=body.include_stop_str_in_output,
            skip_special_tokens=body.skip_special_tokens,
            min_tokens=body.min_tokens,
            logit_bias=bias,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=1.0 if given["repetition_penalty"] is None else given["repetition_penalty"],
            allowed_token_ids=tuple(dict.fromkeys(body.allowed_token_ids or ())),  # each once: at most the vocabulary
            bad_words=bad_words,
        )

    def _bad_word_ids(self, words: list[str]) -> tuple[tuple[int, ...], ...]:
        """The token sequences of `words` as vLLM bans them: each word without its leading spaces, and after one
        space where that makes a new first token (a word in mid-text) of the same length."""
        out: list[tuple[int, ...]] = []
        for word in words:
            alone = tuple(self.tokenizer.encode(word.lstrip()))
            spaced = tuple(self.tokenizer.encode(" " + word.lstrip()))
            if not alone:
                raise InvalidRequestError(f"the bad word {word!r} encodes to no tokens", param="bad_words")
            out += [alone, spaced] if spaced[0] != alone[0] and len(spaced) == len(alone) else [alone]
        return tuple(out)

    def _stop_token_ids(self, body: SamplingFields) -> tuple[int, ...]:
        """The request's stop tokens and, unless it ignores the end of text, the generation config's end-of-turn
        tokens (vLLM's)."""
        ends = () if body.ignore_eos else self.generation.stop_token_ids
        return tuple(dict.fromkeys((*(body.stop_token_ids or ()), *ends)))

    def _check_some_token_allowed(self, body: SamplingFields, bad_words: tuple[tuple[int, ...], ...],
                                  stop_token_ids: tuple[int, ...]) -> None:
        """Refuses allowed_token_ids that the bad words' single tokens, or (before min_tokens) the end of text
        and stop tokens, would always ban every one of."""
        if not body.allowed_token_ids:
            return
        left = set(body.allowed_token_ids) - {word[0] for word in bad_words if len(word) == 1}
        if not left:
            raise InvalidRequestError("bad_words ban every token of allowed_token_ids", param="allowed_token_ids")
        ends = {*stop_token_ids, *((self.tokenizer.eos_token_id,) if not body.ignore_eos else ())}
        if body.min_tokens and not left - ends:
            raise InvalidRequestError(f"allowed_token_ids holds only tokens that end the text, which min_tokens "
                                      f"({body.min_tokens}) bans", param="allowed_token_ids")

    def _bucket(self, prompt_ids: list[int], params: SamplingParams, bucket: str) -> Selection:
        """Each prompt's own bucket: a prompt batched with others is served as it would be alone."""
        limit = self.http.max_context
        n_tokens = len(prompt_ids) + params.max_tokens
        if n_tokens > limit:
            raise InvalidRequestError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = "
                                      f"{n_tokens} exceeds the context limit of {limit} tokens", param="max_tokens",
                                      code="context_length_exceeded")
        try:
            selection = select(self.bank, n_tokens, bucket, self.training_length)
        except UnknownBucketError as bad:
            raise InvalidRequestError(str(bad), param="scale_bucket", code="unknown_scale_bucket") from None
        if selection.extension.decimation is not None and params.prompt_logprobs is not None:
            raise InvalidRequestError(f"bucket {selection.name} decimates the prompt (drops positions in one layer), "
                                      "so it has no logprobs of the prompt's tokens: ask for echo with logprobs "
                                      "with scale_bucket 'none' or a bucket of another method", param="scale_bucket",
                                      code="decimated_prompt_logprobs")
        return selection

    async def prompts(self, prompt: str | list, truncate: int | None = None) -> list[Prompt]:
        """The prompts of a request: a string, token ids, or a non-empty list of either, each cut to its last
        `truncate` tokens when given (-1: the context limit's worth; echo then gives the text of the tokens
        kept). Each one's length is judged as soon as it is known: token ids before anything else, text once
        tokenised.

        Text is tokenised on a worker thread through `encode_batch`, which releases the GIL (`encode` holds it),
        so a long prompt does not stall the event loop and every other client. No bound on the token count is
        drawn from the text's length before that: a token may span many characters and a tokenizer's normaliser
        may shorten the text, so only the body size limit bounds this work."""
        many: list[Any] = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
        if any(not p for p in many):
            raise InvalidRequestError("the prompt is empty", param="prompt")
        keep = self.http.max_context if truncate == -1 else truncate
        if not isinstance(many[0], str):
            return [Prompt(self.token_ids(ids[-keep:] if keep else ids, "prompt"), None) for ids in many]
        encoded = await asyncio.to_thread(self.tokenizer.encode_batch, many)
        out = [Prompt(ids[-keep:], None) if keep and len(ids) > keep else Prompt(ids, text)
               for text, ids in zip(many, encoded)]
        for p in out:
            if not p.ids:
                raise InvalidRequestError("the prompt encodes to no tokens", param="prompt")
            self._check_length(p.ids)
        return out

    def token_ids(self, ids: list[int], param: str) -> list[int]:
        """`ids` when every one is in the vocabulary and they fit the context limit."""
        self._check_length(ids)
        vocab = self.tokenizer.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary (0 … {vocab - 1})", param=param)
        return ids

    def _check_length(self, prompt_ids: list[int]) -> None:
        limit = self.http.max_context
        if len(prompt_ids) > limit:
            raise PromptTooLongError(f"the prompt has {len(prompt_ids)} tokens, more than this server's context "
                                     f"limit of {limit} (--max-context)", param="prompt")

    # --- outputs -------------------------------------------------------------------------------------

    async def outputs(self, submission: Submission) -> AsyncIterator[list[tuple[Choice, RequestOutput]]]:
        """Every choice's outputs up to its last, as they come: each item is what came since the one before, one
        output per choice (the outputs of several engine steps merged when the reader fell behind). A finished
        request with no usable result raises ServerError. Leaving early (client gone, cancellation, an error)
        aborts every choice and frees its slot."""
        pending = len(submission.choices)
        try:
            while pending:
                taken = await submission.outputs.take()
                for _, output in taken:
                    if output.finished and self.http.log_requests:
                        log.info("%s finished: %s, %d prompt and %d generated tokens", output.request_id,
                                 FINISH_REASON[output.status], output.num_prompt_tokens, output.num_output_tokens)
                    _raise_for(output)
                    pending -= output.finished
                yield [(submission.choices[index], output) for index, output in taken]
        finally:
            self.engine.abort(*submission.requests)  # no-op for the finished ones

    async def collect(self, submission: Submission) -> list[ChoiceResult]:
        """Each choice's whole result, in index order."""
        results = [ChoiceResult(choice) for choice in submission.choices]
        async for taken in self.outputs(submission):
            for choice, output in taken:
                results[choice.index].add(output)
        return results

    async def collect_or_abort(self, submission: Submission, http_request: HttpRequest) -> list[ChoiceResult] | None:
        """`collect`, or None when the client went away first (every choice is then aborted)."""
        try:
            return await until_disconnected(self.collect(submission), http_request)
        finally:
            self.engine.abort(*submission.requests)

    async def complete(self, submission: Submission, http_request: HttpRequest, kind: str = "text_completion",
                       choice_json: Callable[[Submission, ChoiceResult], dict] | None = None) -> dict | None:
        """The whole response object of `kind`, each choice made by `choice_json` (default: a completion's
        choice); None when the client went away first."""
        results = await self.collect_or_abort(submission, http_request)
        if results is None:
            return None
        choice_json = choice_json or self._result_choice
        choices = [choice_json(submission, result) for result in results]
        return {**envelope(submission, kind, self.http.served_model_name, choices),
                "usage": usage(submission, results, self.engine_config.prefix_rows > 0)}

    async def stream(self, submission: Submission, usage_chunks: UsageChunks, kind: str = "text_completion",
                     choice_json: Callable[[Submission, ChoiceResult, RequestOutput, bool], dict] | None = None,
                     opening: dict | None = None) -> AsyncIterator[bytes]:
        """Server-sent events: whenever choices have new outputs, one chunk of `kind` for each, made by
        `choice_json(submission, result, output, first)` (default: a completion's choice; `result` holds the
        choice's outputs so far, `output` included) of all that came since its previous chunk (a client that falls
        behind gets several tokens a chunk and catches up), the chunks of one wake-up in one write, each with its
        choice's usage so far when `usage_chunks.continuous`, the first with `opening`'s fields too; a usage chunk
        when `usage_chunks.final`, then [DONE]. An error after the stream began is sent as an {"error": ...}
        event."""
        choice_json = choice_json or self._chunk_choice
        started: set[int] = set()  # choices whose first chunk was sent
        results = [ChoiceResult(choice) for choice in submission.choices]
        model = self.http.served_model_name
        # chunks of one choice without per-chunk usage are written into the stream's frame
        frame = None if usage_chunks.continuous else ChunkFrame(envelope(submission, kind, model, [ChunkFrame.MARK]))
        try:
            async for taken in self.outputs(submission):
                events = []
                for choice, output in taken:
                    results[choice.index].add(output)
                    chunk = choice_json(submission, results[choice.index], output, choice.index not in started)
                    started.add(choice.index)
                    if frame is not None and opening is None:  # a chunk of the choice alone
                        events.append(frame.event(chunk))
                        continue
                    body = {**envelope(submission, kind, model, [chunk]), **(opening or {})}
                    opening = None
                    if usage_chunks.continuous:  # the choice's own, as vLLM counts it
                        body["usage"] = token_counts(len(choice.prompt.ids),
                                                     results[choice.index].final.num_output_tokens)
                    events.append(sse(body))
                yield b"".join(events)
        except ServerError as bad:
            yield sse(bad.to_json())
        else:
            if usage_chunks.final:
                yield sse({**envelope(submission, kind, model, []),
                           "usage": usage(submission, results, self.engine_config.prefix_rows > 0)})
        yield SSE_DONE

    def _result_choice(self, submission: Submission, r: ChoiceResult) -> dict:
        return self._choice(submission, r.choice, r.final, True)

    def _chunk_choice(self, submission: Submission, result: ChoiceResult, output: RequestOutput, first: bool) -> dict:
        return self._choice(submission, result.choice, output, first)

    def _choice(self, submission: Submission, choice: Choice, output: RequestOutput, first: bool) -> dict:
        """One choice of a completion object or chunk, of `output`; in its `first` (or only) one, the prompt goes
        first with echo, and its token ids with return_token_ids."""
        request = choice.request
        prefix = choice.prompt.echoed(self.tokenizer) if submission.echo and first else ""
        body = {"index": choice.index, "text": prefix + output.text, "logprobs": None, **finish_fields(output)}
        if submission.token_ids:
            body.update(prompt_token_ids=choice.prompt.ids if first else None, token_ids=output.token_ids)
        if len(submission.prompts) > 1:
            body.update(scale_fields(choice.selection))
        if request.params.logprobs is not None:
            ids = output.token_ids
            entries: Sequence[TokenLogprob | None] = output.logprobs
            if prefix and output.prompt_logprobs is not None:
                ids, entries = request.prompt_ids + ids, [*output.prompt_logprobs, *output.logprobs]
            body["logprobs"] = self._logprobs_json(ids, entries, submission.tokens_as_ids, request.params.logprobs)
        if submission.prompt_logprobs is not None and output.prompt_logprobs is not None:
            body["prompt_logprobs"] = [None if e is None else self._prompt_logprob_json(e, submission.prompt_logprobs)
                                       for e in output.prompt_logprobs]
        return body

    def _prompt_logprob_json(self, entry: TokenLogprob, k: int) -> dict:
        """vLLM's prompt_logprobs entry of one prompt token: that token, then the k most likely others, each by id
        with its logprob, rank and text."""
        def item(token_id: int, logprob: float, rank: int) -> tuple[str, dict]:
            return str(token_id), {"logprob": logprob, "rank": rank, "decoded_token": self.tokenizer.decode([token_id])}

        return dict([item(entry.token_id, entry.logprob, entry.rank),
                     *(item(i, lp, rank) for rank, (i, lp) in enumerate(entry.top[:k], 1) if i != entry.token_id)])

    def _logprobs_json(self, token_ids: list[int], entries: Sequence[TokenLogprob | None], as_ids: bool,
                       k: int) -> dict:
        """OpenAI's legacy logprobs object with k alternatives a token; text offsets count from the start of this
        choice's text."""
        texts = [self.tokenizer.decode([t]) for t in token_ids]
        offsets, position = [], 0
        for text in texts:
            offsets.append(position)
            position += len(text)

        return {
            "tokens": [self.token_name(t, as_ids) for t in token_ids],
            "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": [None if e is None else {self.token_name(i, as_ids): lp for i, lp in e.top[:k]}
                             for e in entries],
            "text_offset": offsets,
        }

    def token_name(self, token_id: int, as_id: bool) -> str:
        """A token as logprobs name it: its text, or "token_id:<id>" (vLLM's return_tokens_as_token_ids)."""
        return f"token_id:{token_id}" if as_id else self.tokenizer.decode([token_id])

    def chat_logprobs_json(self, token_ids: list[int], entries: Sequence[TokenLogprob], as_ids: bool) -> dict:
        """OpenAI's chat logprobs object: each token with its logprob, its bytes (also those of a character split
        across tokens) and its `top_logprobs` alternatives, best first."""
        def entry(token_id: int, logprob: float) -> dict:
            return {"token": self.token_name(token_id, as_ids), "logprob": logprob,
                    "bytes": list(self.tokenizer.token_bytes(token_id))}

        return {"content": [{**entry(token_id, e.logprob), "top_logprobs": [entry(i, lp) for i, lp in e.top]}
                            for token_id, e in zip(token_ids, entries)]}


def _raise_for(output: RequestOutput) -> None:
    if output.status is RequestStatus.FINISHED_TIMEOUT:
        raise UnavailableError("the request ran past the server's --request-timeout", code="request_timeout")
    if output.status is RequestStatus.FINISHED_ERROR:
        raise EngineFailure(output.error or "the engine failed on this request")
    if output.status is RequestStatus.FINISHED_ABORTED:
        raise UnavailableError("the request was cancelled", code="aborted")


@dataclass
class ChoiceResult:
    """A choice's outputs, gathered into one."""

    choice: Choice
    whole: RequestOutput | None = None  # every output so far, merged

    def add(self, output: RequestOutput) -> None:
        if self.whole is None:  # its own lists: the output taken stays as it was sent
            self.whole = replace(output, token_ids=[*output.token_ids], logprobs=[*output.logprobs])
        else:
            self.whole.extend(output)

    @property
    def final(self) -> RequestOutput:
        """Every output of the choice, up to its last, merged (a result that `collect` returns has them all)."""
        assert self.whole is not None, "the choice has no output yet"
        return self.whole


def finish_fields(output: RequestOutput) -> dict:
    """finish_reason and vLLM's stop_reason (the stop string or stop token id that ended it): null until the end."""
    finished = output.finished
    return {"finish_reason": FINISH_REASON[output.status] if finished else None,
            "stop_reason": output.stop_reason if finished else None}


def envelope(submission: Submission, kind: str, model: str, choices: Sequence[dict | str]) -> dict:
    """A response object (or stream chunk) of `kind` around `choices` (or `ChunkFrame.MARK` in place of a chunk's
    choice), with the scale bucket of its prompts (null when they were served by different ones: each choice then
    names its own)."""
    body = {"id": submission.id, "object": kind, "created": submission.created, "model": model, "choices": choices}
    return {**body, **shared_scale_fields(submission)}


def scale_fields(selection: Selection) -> dict:
    return {"scale_bucket": selection.name, "scale_beyond_largest": selection.beyond_largest,
            "scale_method": selection.method}


def shared_scale_fields(submission: Submission) -> dict:
    """The scale fields of the submission's prompts; null values when they differ."""
    fields = [scale_fields(choice.selection) for choice in submission.choices]
    return fields[0] if all(f == fields[0] for f in fields) else dict.fromkeys(fields[0])


def usage(submission: Submission, results: list[ChoiceResult], cached: bool = False) -> dict:
    """The submission's token counts; with `cached` (prefix caching on), OpenAI's prompt_tokens_details: the prompt
    tokens a stored prefix covered, each prompt counted once."""
    completion = sum(r.whole.num_output_tokens for r in results if r.whole is not None)
    counts = token_counts(submission.num_prompt_tokens, completion)
    if cached:
        covered = sum(max((r.whole.num_cached_tokens for r in results if r.choice.prompt is prompt and r.whole),
                          default=0) for prompt in submission.prompts)
        counts["prompt_tokens_details"] = {"cached_tokens": covered}
    return counts


def token_counts(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(body: dict) -> bytes:
    """The server-sent event of `body`: one data line, as JSON escapes every line break."""
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


class ChunkFrame:
    """A stream's chunks of one choice each, as `sse` writes them, with their envelope encoded once a stream: a
    chunk then encodes its choice alone (a stream's every token goes through here)."""

    MARK = "\x00choice"  # stands for the choice while the envelope is encoded (JSON writes it as \u0000choice)

    def __init__(self, body: dict) -> None:
        """`body`: the chunks' envelope, whose one choice is MARK."""
        self._before, self._after = sse(body).split(json.dumps(self.MARK).encode())  # `sse`'s framing, split

    def event(self, choice: dict) -> bytes:
        """What `sse` makes of the envelope around `choice`."""
        return self._before + json.dumps(choice, ensure_ascii=False).encode() + self._after


async def until_disconnected(work: Awaitable[T], http_request: HttpRequest) -> T | None:
    """`work`'s result, or None (and `work` cancelled) when the client closes the connection first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(http_request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        return task.result() if task in done else None
    finally:
        gone.cancel()
        task.cancel()


async def _disconnected(http_request: HttpRequest) -> None:
    """Returns when the client closes the connection (the body has been read, so only that message is left)."""
    while (await http_request.receive())["type"] != "http.disconnect":
        pass
