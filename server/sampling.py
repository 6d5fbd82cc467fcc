"""Choosing the next token and reporting logprobs. Shapes: b batch, l positions, V vocabulary.

Logits arrive already cut to the tokenizer's vocabulary (the model's rows past it are padding, never tokens).
Each sequence samples with its own `torch.Generator`, and the batch's rows are filtered by operations that work
row by row, so a seed gives the same text whatever else is batched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from runtime.device_copy import to_device

from .request import SamplingParams, TokenLogprob


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits: (b, V). Each row's most likely token, the first of those that tie: (b,). These are max's indices,
    the same as argmax's, because PyTorch's CPU argmax over rows is several times slower, which shows beside a
    small model's decode step."""
    return logits.max(dim=-1).indices


def choose(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator]) -> torch.Tensor:
    """logits: (b, V) float32. Returns one token id per row, (b,) int64 on the logits' device, without waiting
    for the device.

    The sampled rows are filtered and normalised together, each row by its own parameters (every operation works
    along a row, so a row's result does not depend on the others); each draws u ~ U[0, 1) from its own generator
    and takes the first token whose cumulative probability exceeds u (inverse CDF): all on the logits' device, no
    per-row synchronisation."""
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return greedy(logits)
    device = logits.device
    tokens = torch.empty(len(params), dtype=torch.long, device=device)  # (b,)
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    if greedy_rows:
        on_device = to_device(greedy_rows, device)
        tokens[on_device] = greedy(logits[on_device])
    rows, chosen = [params[i] for i in sampled], to_device(sampled, device)
    temperatures = to_device([p.temperature for p in rows], device, torch.float64)[:, None]
    scores = _tempered(logits[chosen], temperatures)  # (r, V)
    probs = torch.softmax(_filtered(scores, [p.top_k for p in rows], [p.top_p for p in rows],
                                    [p.min_p for p in rows]), dim=-1)  # (r, V)
    cdf = probs.cumsum(dim=-1)  # (r, V)
    u = torch.cat([torch.rand(1, generator=generators[i], device=device) for i in sampled])  # (r,)
    # u scaled by the row's total: rounding can leave the last cumulative value just under 1
    choice = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)  # (r,)
    tokens[chosen] = choice.clamp(max=logits.shape[-1] - 1)
    return tokens


def _tempered(scores: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """scores: (r, V) logits, temperature (r, 1) float64. Returns them divided by their row's temperature, in
    float64 and shifted so that each row's largest is 0: then every positive temperature (down to the smallest
    double) gives 0 for the largest and finite or -inf values for the rest, never inf - inf or 0 / 0. A
    temperature just above 0 is thus greedy (the largest logits share all the probability) rather than NaN,
    which the inverse CDF would read as the last token."""
    scores = scores.double()
    return (scores - scores.amax(dim=-1, keepdim=True)) / temperature


def _filtered(scores: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float],
              min_p: Sequence[float]) -> torch.Tensor:
    """scores: (r, V), each row's largest 0 (`_tempered`), and each row's top_k, top_p and min_p. Sets to -inf
    in each row every token less likely than min_p times the most likely one, outside the top k, and outside the
    smallest set of most likely tokens whose probability reaches top_p (the most likely token always stays)."""
    device, vocab = scores.device, scores.shape[-1]
    if any(p > 0 for p in min_p):  # p / p_max = exp(score - 0)
        floor = to_device([math.log(p) if p > 0 else -math.inf for p in min_p], device, scores.dtype)
        scores = scores.masked_fill(scores < floor[:, None], float("-inf"))
    if not any(0 < k < vocab for k in top_k) and not any(p < 1.0 for p in top_p):
        return scores
    ordered, order = torch.sort(scores, dim=-1, descending=True, stable=True)  # (r, V)
    if any(0 < k < vocab for k in top_k):
        kth = ordered.gather(-1, to_device([k - 1 if 0 < k < vocab else vocab - 1 for k in top_k],
                                           device)[:, None])  # (r, 1): the last row value keeps every token
        scores = scores.masked_fill(scores < kth, float("-inf"))
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))  # still in descending order
    if any(p < 1.0 for p in top_p):
        probs = torch.softmax(ordered, dim=-1)  # (r, V)
        before = probs.cumsum(-1) - probs  # (r, V): probability mass of the tokens ranked above each one
        limit = to_device([p if p < 1.0 else math.inf for p in top_p], device, scores.dtype)
        drop = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, before >= limit[:, None])
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def logprob_entries(logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[TokenLogprob]:
    """logits: (l, V) of the positions that predict `targets` (l,). Returns each target's logprob under the
    model's distribution, its rank there (1 + the tokens more likely) and the k most likely tokens there."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (l, V)
    chosen = logp.gather(-1, targets[:, None])  # (l, 1)
    ranks = ((logp > chosen).sum(dim=-1) + 1).tolist()  # (l,)
    top_values, top_ids = torch.topk(logp, k, dim=-1) if k > 0 else (logp[:, :0], logp[:, :0].long())  # (l, k)
    return [TokenLogprob(int(t), lp, tuple(zip(ids, values)), rank)
            for t, lp, ids, values, rank in zip(targets.tolist(), chosen.squeeze(-1).tolist(), top_ids.tolist(),
                                                top_values.tolist(), ranks)]
