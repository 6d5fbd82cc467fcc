"""The wire format both clients share: the request body of POST /v1/completions and the stream's events."""

from __future__ import annotations

import json

from .errors import APIError
from .types import StreamChunk

COMPLETIONS_PATH = "/v1/completions"
DONE = object()  # the `data: [DONE]` event that ends a stream


def completion_body(prompt: str | list[int], *, max_tokens: int = 16, temperature: float | None = None,
                    top_p: float | None = None, top_k: int | None = None, stop: str | list[str] | None = None,
                    seed: int | None = None, scale_bucket: str | None = None, model: str | None = None,
                    **extra) -> dict:
    """The JSON body of a completion request. Fields left None are left out, so the server's defaults apply
    (the model's generation config, else temperature 1 and top_p 1; scale_bucket "auto"; the served model).
    `scale_bucket` is this server's own field: "auto", "none" or a bank bucket name such as "8k". `extra` passes
    any other OpenAI field as it is (echo, logprobs, ...)."""
    fields = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
              "top_p": top_p, "top_k": top_k, "stop": stop, "seed": seed, "scale_bucket": scale_bucket, **extra}
    return {name: value for name, value in fields.items() if value is not None}


def stream_body(prompt: str | list[int], include_usage: bool, **params) -> dict:
    body = completion_body(prompt, **params)
    body["stream"] = True
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return body


def parse_event_line(line: str):
    """One line of the server-sent event stream: a StreamChunk, DONE, or None for lines that carry no data
    (blank separators, `: ping` heartbeats). An `{"error": ...}` event, sent when a request fails after its
    stream began, raises APIError with status None."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    if data == "[DONE]":
        return DONE
    event = json.loads(data)
    if "error" in event:
        raise APIError.from_error_object(None, event["error"])
    return StreamChunk.from_json(event)
