"""Typed results: the server's completion objects and stream chunks as frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def from_json(cls, data: dict) -> Usage:
        return cls(data["prompt_tokens"], data["completion_tokens"], data["total_tokens"])


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    finish_reason: str | None  # "stop" | "length"; None on a stream chunk before the last
    logprobs: dict | None  # OpenAI's legacy logprobs object, when the request asked for logprobs
    stop_reason: str | int | None = None  # the stop string or stop token id that ended the choice, if one did

    @classmethod
    def from_json(cls, data: dict) -> Choice:
        return cls(data["index"], data["text"], data.get("finish_reason"), data.get("logprobs"),
                   data.get("stop_reason"))


@dataclass(frozen=True)
class CompletionObject:
    """The fields a completion and a stream chunk share (`object: "text_completion"`)."""

    id: str
    model: str
    created: int
    choices: tuple[Choice, ...]
    usage: Usage | None
    scale_bucket: str | None  # the bank bucket whose scales served the request; "none": identity
    scale_beyond_largest: bool  # the request reached past the largest bucket, which served it
    scale_method: str | None  # the bucket's method as applied ("delta", "a_spectrum"); None: no scales applied

    @classmethod
    def from_json(cls, data: dict):
        usage = data.get("usage")
        return cls(data["id"], data["model"], data["created"], tuple(Choice.from_json(c) for c in data["choices"]),
                   None if usage is None else Usage.from_json(usage), data.get("scale_bucket"),
                   bool(data.get("scale_beyond_largest")), data.get("scale_method"))

    @property
    def text(self) -> str:
        """The first choice's text ("" when there is none, as on the final usage chunk)."""
        return self.choices[0].text if self.choices else ""

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None


@dataclass(frozen=True)
class Completion(CompletionObject):
    """A whole completion (a request without `stream`)."""

    usage: Usage  # always there on a whole completion


@dataclass(frozen=True)
class StreamChunk(CompletionObject):
    """One `data:` event of a stream: the text of one engine step. With `include_usage` the stream ends with a
    chunk whose `choices` are empty and whose `usage` is set; every other chunk has `usage` None."""
