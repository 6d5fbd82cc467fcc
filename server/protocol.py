"""The OpenAI completions request as pydantic sees it: the HTTP boundary, the only place pydantic is used."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidRequestError

MAX_LOGPROBS = 20  # alternatives per token, as vLLM allows (OpenAI: 5)
# Stop strings are searched for on the engine thread after every token (server.detokenizer), in up to
# count × length comparisons of up to length characters each, which holds back every other stream, so both are
# bounded: OpenAI allows 4 strings, vLLM any number; 16 of up to 256 characters cover real uses (chat turn
# markers, code fences).
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    # strict: "5" is not a number, true is not 1. Unknown OpenAI fields (user, suffix, ...) are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None  # None: the served model
    # a string or token ids; a list holding one of those is accepted too (lm-evaluation-harness sends that)
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # None: 16, as OpenAI
    temperature: float | None = Field(1.0, ge=0, allow_inf_nan=False)  # JSON's Infinity would make every score NaN
    top_p: float | None = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1, 0 or None: off
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    n: int = 1
    scale_bucket: str = "auto"  # "auto", "none", or a bank bucket name

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


def parse_completion_request(body: bytes) -> CompletionRequest:
    """Raises InvalidRequestError naming the fault (and the field, where there is one)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as bad:
        raise InvalidRequestError(f"the request body is not valid UTF-8 ({bad.reason} at byte {bad.start})") from None
    try:
        return CompletionRequest.model_validate_json(text)
    except ValidationError as bad:
        error = bad.errors()[0]
        if error["type"] == "json_invalid":
            raise InvalidRequestError(f"malformed JSON: {error['ctx']['error']}") from None
        loc = [str(part) for part in error["loc"] if not isinstance(part, int)][:1]
        param = loc[0] if loc else None
        raise InvalidRequestError(f"{param or 'body'}: {error['msg']}", param=param) from None
