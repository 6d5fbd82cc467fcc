"""What a request's sampling fields do to the model's scores before its next token is chosen: repetition
penalty, presence and frequency penalties, logit bias, then the bans: the end-of-text and stop-token ban that
`min_tokens` sets, the last token of each bad word whose other tokens the completion ends with, every token
outside `allowed_token_ids`, and every token a guided request's grammar cannot take next (server.guided).
Temperature, top-k, top-p and min-p follow in server.sampling.

The logprobs reported to clients are the model's own scores, taken before any of this (as vLLM reports them by
default), so that scoring a text does not depend on how it was sampled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .request import Request


def adjusted(logits: torch.Tensor, requests: Sequence[Request], eos_token_id: int | None) -> torch.Tensor:
    """logits: (b, V), one row per request. Returns `logits` itself when no request adjusts its scores, else a
    copy with each such row adjusted. A request whose own fields fail (its grammar leaves no token) gets its
    `fault` set and its row unadjusted: the batch's choice goes on, and the engine ends that request alone."""
    rows = [i for i, request in enumerate(requests) if request.params.adjusts_logits]
    if not rows:
        return logits
    out = logits.clone()
    for i in rows:
        try:
            out[i] = _adjusted_row(out[i], requests[i], eos_token_id)
        except Exception as bad:
            requests[i].fault = f"{type(bad).__name__}: {bad}"
    return out


def _adjusted_row(scores: torch.Tensor, request: Request, eos_token_id: int | None) -> torch.Tensor:
    """scores: (V,) of one request, changed by its own fields."""
    params, vocab, device = request.params, scores.shape[-1], scores.device
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        seen[torch.tensor(request.prompt_ids + request.output_ids, device=device)] = True
        penalised = torch.where(scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty)
        scores = torch.where(seen, penalised, scores)
    if (params.presence_penalty or params.frequency_penalty) and request.output_ids:
        counts = torch.bincount(torch.tensor(request.output_ids, device=device), minlength=vocab).to(scores.dtype)
        scores = scores - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(scores.dtype)
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias)
        scores = scores.index_add(0, torch.tensor(ids, device=device),
                                  torch.tensor(biases, dtype=scores.dtype, device=device))
    # a penalty can overflow to +inf (a repetition penalty of 1e-30), which sampling would turn into NaN: the
    # largest float keeps such tokens the likeliest
    scores = scores.clamp(max=torch.finfo(scores.dtype).max)
    allowed = scores
    if params.allowed_token_ids:
        allowed_ids = torch.tensor(params.allowed_token_ids, device=device)
        allowed = torch.full_like(scores, float("-inf")).index_copy(0, allowed_ids, scores[allowed_ids])
    if request.guide is not None:  # what its grammar can take next
        allowed = request.guide.mask(allowed)
    banned = bad_word_ends(params.bad_words, request.output_ids)
    if len(request.output_ids) < params.min_tokens:
        banned += [*params.stop_token_ids, *([] if params.ignore_eos or eos_token_id is None else [eos_token_id])]
    if not banned:
        return allowed
    kept = allowed.index_fill(0, torch.tensor(banned, device=device), float("-inf"))
    # bans that leave no token (a bad word's end the only allowed token) are lifted for this step: admission
    # refuses the fields that always would (server.serving), this keeps the rest choosing an allowed token
    return torch.where(torch.isneginf(kept).all(), allowed, kept)


def bad_word_ends(bad_words: Sequence[Sequence[int]], generated: Sequence[int]) -> list[int]:
    """The last token of each bad word whose other tokens `generated` ends with (as vLLM matches them: against
    the generated tokens only, not the prompt)."""
    ends = []
    for word in bad_words:
        prefix = len(word) - 1
        if prefix <= len(generated) and list(generated[len(generated) - prefix:]) == list(word[:-1]):
            ends.append(word[-1])
    return ends
