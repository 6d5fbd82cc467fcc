"""The one exception the client raises: an OpenAI error object from the server, or a transport fault."""

from __future__ import annotations

import json


class APIError(Exception):
    """A failed request.

    status: the HTTP status (400, 404, 413, 429, 503, ...); None when no status applies: the error came as an
            event after a stream had begun, or the request never got an answer (type "timeout" or
            "connection_error").
    type, code, param, message: the fields of the server's `{"error": {...}}` object.
    """

    def __init__(self, status: int | None, type: str, message: str, code: str | None = None,
                 param: str | None = None):
        super().__init__(f"{status or ''} {type}{f' ({code})' if code else ''}: {message}".lstrip())
        self.status = status
        self.type = type
        self.code = code
        self.param = param
        self.message = message

    @classmethod
    def from_error_object(cls, status: int | None, error: dict) -> APIError:
        """From the `error` member of an OpenAI error body."""
        return cls(status, error.get("type") or "server_error", error.get("message") or "", error.get("code"),
                   error.get("param"))

    @classmethod
    def from_body(cls, status: int, body: bytes) -> APIError:
        """From a non-2xx response; a body that is not OpenAI error JSON (a proxy's page) becomes the message."""
        try:
            error = json.loads(body)["error"]
            if not isinstance(error, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return cls(status, "http_error", body.decode("utf-8", "replace")[:500] or f"HTTP {status}")
        return cls.from_error_object(status, error)
