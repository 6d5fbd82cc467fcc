"""Choosing the next token and reporting logprobs. Shapes: b batch, l positions, V vocabulary.

Logits arrive already cut to the tokenizer's vocabulary (the model's rows past it are padding, never tokens).
Each sequence samples with its own `torch.Generator`, so a seed gives the same text whatever else is batched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .request import SamplingParams, TokenLogprob


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]) -> list[int]:
    """logits: (b, V) float32. Returns one token id per row, read back from the device once for the batch.

    A sampled row draws u ~ U[0, 1) from its own generator and takes the first token whose cumulative
    probability exceeds u (inverse CDF): all on the logits' device, no per-row synchronisation."""
    tokens = logits.argmax(dim=-1)  # (b,): the greedy choice, kept for temperature 0
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        probs = torch.stack([torch.softmax(_filtered(_tempered(logits[i], params[i].temperature), params[i].top_k,
                                                     params[i].top_p, params[i].min_p), dim=-1)
                             for i in sampled])  # (r, V)
        cdf = probs.cumsum(dim=-1)  # (r, V)
        u = torch.cat([torch.rand(1, generator=generators[i], device=logits.device) for i in sampled])  # (r,)
        # u scaled by the row's total: rounding can leave the last cumulative value just under 1
        choice = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)  # (r,)
        tokens[torch.tensor(sampled, device=logits.device)] = choice.clamp(max=logits.shape[-1] - 1)
    return tokens.tolist()


def _tempered(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """scores: (V,) logits. Returns them divided by `temperature`, in float64 and shifted so that the largest is 0:
    then every positive temperature (down to the smallest double) gives 0 for the largest and finite or -inf
    values for the rest, never inf - inf or 0 / 0. A temperature just above 0 is thus greedy (the largest logits
    share all the probability) rather than NaN, which the inverse CDF would read as the last token."""
    scores = scores.double()
    return (scores - scores.max()) / temperature


def _filtered(scores: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """scores: (V,), the largest 0 (`_tempered`). Sets to -inf every token less likely than min_p times the most
    likely one, outside the top k, and outside the smallest set of most likely tokens whose probability reaches
    top_p (the most likely token always stays)."""
    if min_p > 0:
        scores = scores.masked_fill(scores < math.log(min_p), float("-inf"))  # p / p_max = exp(score - 0)
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)  # (V,)
        probs = torch.softmax(ordered, dim=-1)
        before = probs.cumsum(-1) - probs  # (V,): probability mass of the tokens ranked above each one
        drop = torch.zeros_like(scores, dtype=torch.bool).scatter(0, order, before >= top_p)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def logprob_entries(logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[TokenLogprob]:
    """logits: (l, V) of the positions that predict `targets` (l,). Returns each target's logprob under the
    model's distribution and the k most likely tokens there."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (l, V)
    chosen = logp.gather(-1, targets[:, None]).squeeze(-1).tolist()  # (l,)
    top_values, top_ids = torch.topk(logp, k, dim=-1) if k > 0 else (logp[:, :0], logp[:, :0].long())  # (l, k)
    return [TokenLogprob(int(t), lp, tuple(zip(ids, values)))
            for t, lp, ids, values in zip(targets.tolist(), chosen, top_ids.tolist(), top_values.tolist())]
