"""A request's whole life in the engine: its parameters, scale bucket, state slot, tokens and timing.

Life cycle: WAITING → PREFILLING → DECODING → one FINISHED_* status. Only the engine thread changes a
request after it is submitted, except `abort_requested`, which the engine's caller sets (under the engine lock).
"""

from __future__ import annotations

import concurrent.futures
import enum
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from dataclasses import dataclass, field, fields
from operator import attrgetter

from .detokenizer import OutputText

if TYPE_CHECKING:
    from .guided import Guide, GuideState
    from .logits_adjustment import LogitBooks


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # in the bounded queue, no state slot yet
    PREFILLING = "prefilling"  # holds a slot; its prompt runs chunk by chunk
    DECODING = "decoding"  # prompt done; one token per engine step
    FINISHED_STOPPED = "stopped"  # end of text or a stop string
    FINISHED_LENGTH = "length"  # max_tokens reached
    FINISHED_ABORTED = "aborted"  # the client went away
    FINISHED_TIMEOUT = "timeout"  # ran past --request-timeout
    FINISHED_ERROR = "error"  # the model raised

    @property
    def finished(self) -> bool:
        return self in FINISH_REASON


# The OpenAI `finish_reason` of each finished status (vLLM's names where OpenAI has none).
FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_TIMEOUT: "timeout",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int  # ≥ 0; 0 runs the prompt only (prompt logprobs)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # in (0, 1]
    top_k: int = 0  # ≤ 0: off
    seed: int | None = None  # same seed, same text
    stop: tuple[str, ...] = ()  # stop strings, not emitted
    logprobs: int | None = None  # top alternatives per token; None: no logprobs
    prompt_logprobs: int | None = None  # score the prompt's tokens too, with this many alternatives; None: no
    min_p: float = 0.0  # drop tokens less likely than min_p × the most likely one's probability
    stop_token_ids: tuple[int, ...] = ()  # these end the completion (kept in its tokens, not in its text)
    ignore_eos: bool = False  # end of text does not end the completion
    include_stop_str: bool = False  # the stop string that ends a completion stays at the end of its text
    skip_special_tokens: bool = True  # special tokens (end of text, padding) add no text, as vLLM's default
    min_tokens: int = 0  # before this many tokens, end of text, stop tokens and stop strings cannot end it
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted once per time a token was already generated
    repetition_penalty: float = 1.0  # divides positive (multiplies negative) logits of prompt and generated tokens
    allowed_token_ids: tuple[int, ...] = ()  # only these may be chosen; empty: every token
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences never generated: a sequence's last token is banned
    # where the generated tokens end with the rest of it
    guide: Guide | None = None  # structured output: the grammar the completion follows (server.guided)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def adjusts_logits(self) -> bool:
        """Some field changes the model's scores before the choice (server.logits_adjustment)."""
        return bool(self.logit_bias or self.presence_penalty or self.frequency_penalty or self.min_tokens
                    or self.repetition_penalty != 1.0 or self.allowed_token_ids or self.bad_words
                    or self.guide is not None)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the `k` most likely tokens and their logprobs, best first
    rank: int = 1  # the token's place among the vocabulary's by probability (1: the most likely)


@dataclass
class RequestOutput:
    """What one engine step adds to a request, handed to the request's sink."""

    request_id: str
    text: str  # text that became final this step (held-back text comes later or never)
    token_ids: list[int]  # tokens generated this step
    logprobs: list[TokenLogprob]  # of `token_ids`, when asked
    prompt_logprobs: list[TokenLogprob | None] | None  # first output only, when asked; None for the first token
    status: RequestStatus
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens a stored prefix state covered (prefix caching)
    stop_reason: str | int | None = None  # finished: the stop string or stop token id that ended it; None otherwise

    @property
    def finished(self) -> bool:
        return self.status.finished

    def __reduce__(self) -> tuple[type[RequestOutput], tuple]:
        # the fields in order, for the constructor, rather than a dataclass's default state dict: the engine process
        # pickles every output of every step and the HTTP side unpickles them
        return RequestOutput, _output_fields(self)

    def extend(self, later: RequestOutput) -> None:
        """Appends the request's next output: this one then reads as one output of both steps."""
        assert not self.finished, "a finished request has no later output"
        self.text += later.text
        self.token_ids += later.token_ids
        self.logprobs += later.logprobs
        if self.prompt_logprobs is None:
            self.prompt_logprobs = later.prompt_logprobs
        self.status, self.num_output_tokens = later.status, later.num_output_tokens
        self.num_cached_tokens = max(self.num_cached_tokens, later.num_cached_tokens)
        self.error, self.stop_reason = later.error, later.stop_reason


_output_fields = attrgetter(*(f.name for f in fields(RequestOutput)))


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    scale_bucket: str  # the bank's bucket whose extension it runs with ("none": identity); reported in metrics
    text: OutputText  # incremental detokeniser with the stop strings
    sink: Callable[[RequestOutput], None]  # receives every output; called on the engine thread
    timeout: float | None = None  # seconds from arrival
    decimates: bool = False  # its bucket drops prompt positions (a decimation): the prompt prefills whole, alone
    # n > 1: the other samples of this prompt. They wait, hold slots and prefill with this request, which copies its
    # state into their slots when the prompt is done; then each decodes on its own.
    forks: list[Request] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    abort_requested: bool = False
    slot: int | None = None  # row of the engine's state pool while PREFILLING or DECODING
    num_computed: int = 0  # prompt tokens prefilled so far
    output_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # filled chunk by chunk when asked
    generator: random.Random | None = None  # per-request sampling randomness, made at admission
    grammar: concurrent.futures.Future | None = None  # params.guide's compiled grammar, compiling from submission
    guide: GuideState | None = None  # its place in that grammar, made at its first choice
    logit_books: LogitBooks | None = None  # its adjustments' tensors, made at its first adjusted choice
    resume_row: int | None = None  # admitted onto a stored prefix: its prefix cache row, until the engine loads it
    num_cached: int = 0  # prompt tokens that stored prefix covered
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (vLLM's stop_reason)
    fault: str | None = None  # its own fields failed in a step (its grammar at a dead end): it ends with this error
    admitted_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None

    def __post_init__(self):
        assert self.prompt_ids, "a request needs at least one prompt token"

    @property
    def deadline(self) -> float | None:
        return None if self.timeout is None else self.arrival_time + self.timeout

    @property
    def prompt_left(self) -> int:
        """Prompt tokens not yet prefilled."""
        return len(self.prompt_ids) - self.num_computed

    @property
    def group(self) -> list[Request]:
        """This request and its forks: what is admitted together."""
        return [self, *self.forks]

    @property
    def compiling(self) -> bool:
        """Its grammar is still being compiled (server.guided): it waits in the queue, holding up no other."""
        return self.grammar is not None and not self.grammar.done()
