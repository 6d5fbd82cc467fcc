"""Typed errors of the server. Inner layers raise them; one HTTP handler turns each into OpenAI error JSON
(`{"error": {"message", "type", "param", "code"}}`) with the status it carries."""

from __future__ import annotations


class ServerError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_json(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequestError(ServerError):
    status = 400
    type = "invalid_request_error"


class _UnreadBodyError(InvalidRequestError):
    """An answer given before the whole request body was read: the connection closes after it."""

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}  # the unread rest of the body would be taken for the next request


class BodyTooLargeError(_UnreadBodyError):
    """The request body is over --max-body-bytes; the rest of it is never read."""

    status = 413
    code = "request_too_large"


class BodyTimeoutError(_UnreadBodyError):
    """The request body did not arrive within --body-timeout (a client too slow, or stalled)."""

    status = 408
    code = "body_timeout"


class PromptTooLongError(InvalidRequestError):
    status = 413
    code = "context_length_exceeded"


class ModelNotFoundError(InvalidRequestError):
    status = 404
    code = "model_not_found"


class ResponseNotFoundError(InvalidRequestError):
    status = 404
    code = "response_not_found"


class AuthenticationError(ServerError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class QueueFullError(ServerError):
    """The waiting queue is at --max-queue; the client should retry after `retry_after` seconds."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class UnavailableError(ServerError):
    """The engine cannot take or finish the request (stopped, or the request ran past --request-timeout)."""

    status = 503
    type = "unavailable_error"


class EngineFailure(ServerError):
    """The model raised while running the request; the engine goes on with the others."""

    code = "engine_error"
