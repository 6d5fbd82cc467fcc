"""Python client of mamba-extend-server's OpenAI-compatible completions API (imports none of the server).

    from clients import Client
    with Client("http://127.0.0.1:8000") as client:
        print(client.complete("Once upon a time", max_tokens=32, temperature=0).text)
        for chunk in client.stream("Once upon a time", max_tokens=32, scale_bucket="8k"):
            print(chunk.text, end="", flush=True)

`AsyncClient` is the same for asyncio. Answers 429 and 503 are retried with back-off (`RetryPolicy`, honouring
Retry-After); every failure raises `APIError`. `python -m clients` is the command line (complete, bench).
"""

from .client import DEFAULT_BASE_URL, AsyncClient, Client
from .errors import APIError
from .retry import RetryPolicy
from .types import Choice, Completion, CompletionObject, StreamChunk, Usage

__all__ = ["DEFAULT_BASE_URL", "APIError", "AsyncClient", "Choice", "Client", "Completion", "CompletionObject",
           "RetryPolicy", "StreamChunk", "Usage"]
