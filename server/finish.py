"""The finish rules: whether a request's newest token ends it, and the text that token makes final."""

from __future__ import annotations

from .request import Request, RequestStatus


def take_token(request: Request, token: int, eos_token_id: int | None) -> tuple[str, RequestStatus | None]:
    """Applies the rules to `token`, already appended to `request.output_ids`, in order: end of text (unless
    ignored, but always where it ends a guided request's grammar), a stop token, a stop string (the text
    detokenised so far), max_tokens. Sets the request's `stop_reason` where a stop token or string ends it.
    Returns the text that became final (none for a token that ends the request before its text) and the finished
    status, or None while the request goes on."""
    grammar_over = request.guide is not None and request.guide.accept(token)
    if token == eos_token_id and (grammar_over or not request.params.ignore_eos):
        return "", RequestStatus.FINISHED_STOPPED
    if token in request.params.stop_token_ids:
        request.stop_reason = token
        return "", RequestStatus.FINISHED_STOPPED
    text = request.text.push(token)
    if request.text.stopped:
        request.stop_reason = request.text.stop_string
        return text, RequestStatus.FINISHED_STOPPED
    if len(request.output_ids) >= request.params.max_tokens:
        return text, RequestStatus.FINISHED_LENGTH
    return text, None
