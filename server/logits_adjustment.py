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

from .guided import Guides
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


class LogitBooks:
    """One request's tensors for its adjustments, made at its first adjusted choice and brought up to date with the
    tokens it generated since, so that a step's work does not grow with its prompt, its output or the length of its
    lists: a long prompt under a repetition penalty, or an allowed_token_ids or logit_bias of the whole vocabulary,
    would otherwise be rebuilt into a tensor at every step, on the engine thread, in the step others share."""

    def __init__(self, request: Request, scores: torch.Tensor):
        params, vocab, device = request.params, scores.shape[-1], scores.device
        self.device = device
        self.seen: torch.Tensor | None = None  # (V,) bool: tokens of the prompt and output (repetition penalty)
        self.counts: torch.Tensor | None = None  # (V,) float32: each token's count in the output
        self.allowed: torch.Tensor | None = None  # (V,) bool: allowed_token_ids
        self.bias: torch.Tensor | None = None  # (V,) float32: logit_bias, 0 for the tokens it does not name
        self.outputs = 0  # the output tokens counted so far
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen[torch.tensor(request.prompt_ids, device=device)] = True
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)  # counted exactly past 256
        if params.allowed_token_ids:
            self.allowed = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.allowed[torch.tensor(params.allowed_token_ids, device=device)] = True
        if params.logit_bias:
            ids, biases = zip(*params.logit_bias)
            self.bias = torch.zeros(vocab, dtype=torch.float32, device=device)
            self.bias.index_add_(0, torch.tensor(ids, device=device), torch.tensor(biases, device=device))  # "5", "05"

    def update(self, output_ids: Sequence[int]) -> None:
        """Counts the output tokens generated since the last update."""
        if len(output_ids) == self.outputs or (self.seen is None and self.counts is None):
            return
        new = torch.tensor(output_ids[self.outputs:], device=self.device)
        if self.seen is not None:
            self.seen[new] = True
        if self.counts is not None:
            self.counts.index_add_(0, new, torch.ones(len(new), dtype=self.counts.dtype, device=self.device))
        self.outputs = len(output_ids)


def _adjusted_row(scores: torch.Tensor, request: Request, eos_token_id: int | None) -> torch.Tensor:
    """scores: (V,) of one request, changed by its own fields."""
    params, device = request.params, scores.device
    if request.logit_books is None:
        request.logit_books = LogitBooks(request, scores)
    books = request.logit_books
    books.update(request.output_ids)
    if books.seen is not None:
        penalised = torch.where(scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty)
        scores = torch.where(books.seen, penalised, scores)
    if books.counts is not None and books.outputs:
        counts = books.counts.to(scores.dtype)
        scores = scores - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(scores.dtype)
    if books.bias is not None:
        scores = scores + books.bias.to(scores.dtype)
    # a penalty can overflow to +inf (a repetition penalty of 1e-30), which sampling would turn into NaN: the
    # largest float keeps such tokens the likeliest
    scores = scores.clamp(max=torch.finfo(scores.dtype).max)
    allowed = scores
    if books.allowed is not None:
        allowed = scores.masked_fill(~books.allowed, float("-inf"))
    if request.grammar is not None:  # what its grammar can take next
        if request.guide is None:  # its first choice: the grammar, compiled before admission, starts
            request.guide = Guides.state(request.grammar.result())
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
