"""Clients of one server's completions API: `Client` (blocking) and `AsyncClient` (asyncio), both over httpx.

Both send the same bodies (`protocol.completion_body`), retry 429 and 503 answers by the same `RetryPolicy`
(honouring Retry-After), and raise `APIError` for every failure. They differ only in how they wait, which is
why `_post` and `stream` exist once per class.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import httpx

from .errors import APIError
from .protocol import COMPLETIONS_PATH, DONE, completion_body, parse_event_line, stream_body
from .retry import DEFAULT_RETRY, RetryPolicy
from .types import Completion, StreamChunk

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# Seconds to connect, and between two reads of an answer. A non-streamed answer arrives only once the whole
# prompt is prefilled and every token generated: minutes for a long prompt on a CPU, hence generous.
DEFAULT_TIMEOUT = 600.0


@contextmanager
def transport_errors() -> Iterator[None]:
    """httpx's transport faults as APIError (status None), so callers catch one exception type."""
    try:
        yield
    except httpx.TimeoutException as bad:
        raise APIError(None, "timeout", f"no answer in time: {bad!r}") from bad
    except httpx.TransportError as bad:
        raise APIError(None, "connection_error", f"{type(bad).__name__}: {bad}") from bad


def _headers(api_key: str | None) -> dict[str, str]:
    return {} if api_key is None else {"Authorization": f"Bearer {api_key}"}


def _log_retry(status: int, retry: int, policy: RetryPolicy, delay: float) -> None:
    log.warning("POST %s answered %d; retry %d of %d in %.2f s", COMPLETIONS_PATH, status, retry + 1,
                policy.max_retries, delay)


def _stream_ended_early() -> APIError:
    return APIError(None, "connection_error", "the stream ended before its [DONE] event")


class Client:
    """A blocking client: `complete` returns a Completion, `stream` yields StreamChunks as they arrive.

    Parameters of `complete` and `stream` are those of `protocol.completion_body` (max_tokens, temperature,
    top_p, top_k, stop, seed, scale_bucket, model, and any other OpenAI field by name).
    """

    def __init__(self, base_url: str = DEFAULT_BASE_URL, *, api_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, retry: RetryPolicy = DEFAULT_RETRY):
        self.retry = retry
        self._http = httpx.Client(base_url=base_url, headers=_headers(api_key), timeout=timeout)

    def complete(self, prompt: str | list[int], **params) -> Completion:
        with self._post(completion_body(prompt, **params)) as response, transport_errors():
            return Completion.from_json(json.loads(response.read()))

    def stream(self, prompt: str | list[int], *, include_usage: bool = False, **params) -> Iterator[StreamChunk]:
        """Leaving the loop early closes the connection, which cancels the request on the server."""
        with self._post(stream_body(prompt, include_usage, **params)) as response, transport_errors():
            for line in response.iter_lines():
                event = parse_event_line(line)
                if event is DONE:
                    return
                if event is not None:
                    yield event
        raise _stream_ended_early()

    @contextmanager
    def _post(self, body: dict) -> Iterator[httpx.Response]:
        """The first answer that is not to be retried, open for reading; APIError if it is an error."""
        retry = 0
        while True:
            with transport_errors():
                response = self._http.send(self._http.build_request("POST", COMPLETIONS_PATH, json=body), stream=True)
            delay = self.retry.delay(retry, response.status_code, response.headers)
            if delay is None:
                break
            response.close()
            _log_retry(response.status_code, retry, self.retry, delay)
            time.sleep(delay)
            retry += 1
        try:
            if response.is_error:
                with transport_errors():
                    response.read()
                raise APIError.from_body(response.status_code, response.content)
            yield response
        finally:
            response.close()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of `Client`: `await complete(...)`, `async for chunk in stream(...)`."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, *, api_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, retry: RetryPolicy = DEFAULT_RETRY,
                 max_connections: int = 100):
        self.retry = retry
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(base_url=base_url, headers=_headers(api_key), timeout=timeout, limits=limits)

    async def complete(self, prompt: str | list[int], **params) -> Completion:
        async with self._post(completion_body(prompt, **params)) as response:
            with transport_errors():
                return Completion.from_json(json.loads(await response.aread()))

    async def stream(self, prompt: str | list[int], *, include_usage: bool = False,
                     **params) -> AsyncIterator[StreamChunk]:
        async with self._post(stream_body(prompt, include_usage, **params)) as response:
            with transport_errors():
                async for line in response.aiter_lines():
                    event = parse_event_line(line)
                    if event is DONE:
                        return
                    if event is not None:
                        yield event
        raise _stream_ended_early()

    @asynccontextmanager
    async def _post(self, body: dict) -> AsyncIterator[httpx.Response]:
        retry = 0
        while True:
            with transport_errors():
                request = self._http.build_request("POST", COMPLETIONS_PATH, json=body)
                response = await self._http.send(request, stream=True)
            delay = self.retry.delay(retry, response.status_code, response.headers)
            if delay is None:
                break
            await response.aclose()
            _log_retry(response.status_code, retry, self.retry, delay)
            await asyncio.sleep(delay)
            retry += 1
        try:
            if response.is_error:
                with transport_errors():
                    await response.aread()
                raise APIError.from_body(response.status_code, response.content)
            yield response
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
