"""Choosing the next token and reporting logprobs. Shapes: b batch, l positions, V vocabulary.

Logits arrive already cut to the tokenizer's vocabulary (the model's rows past it are padding, never tokens).
Each sequence samples with its own generator (a `random.Random`, drawn on the host: the same draws on every
device), and the batch's rows are filtered by operations that work row by row, so a seed gives the same text
whatever else is batched.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from runtime.device_copy import to_device

from .request import SamplingParams, TokenLogprob

SMALLEST_TEMPERATURE = torch.finfo(torch.float32).tiny
LARGEST_TEMPERATURE = torch.finfo(torch.float32).max
U_BITS = 24  # a uniform draw's random bits: every value a float32 holds exactly


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits: (b, V). Each row's most likely token, the first of those that tie: (b,). These are max's indices,
    the same as argmax's, because PyTorch's CPU argmax over rows is several times slower, which shows beside a
    small model's decode step."""
    return logits.max(dim=-1).indices


def choose(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[random.Random]) -> torch.Tensor:
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
    rows = [params[i] for i in sampled]
    chosen = None if len(sampled) == len(params) else to_device(sampled, device)  # (r,); None: every row
    # a temperature below float32's smallest normal number samples as that one does (greedy, ties shared), one
    # above its largest as that one does (evenly among the tokens left): never inf, which makes a banned token's
    # -inf NaN
    temperatures = to_device([min(max(p.temperature, SMALLEST_TEMPERATURE), LARGEST_TEMPERATURE) for p in rows],
                             device, torch.float32)
    scores = _tempered(logits if chosen is None else logits[chosen], temperatures[:, None])  # (r, V)
    _filter(scores, [p.top_k for p in rows], [p.top_p for p in rows], [p.min_p for p in rows])
    # (softmax's exponential, unlike exp's, is as fast where it underflows: a low temperature, filtered tokens)
    cdf = torch.softmax(scores, dim=-1).cumsum_(dim=-1)  # (r, V)
    # u ~ U[0, 1) from each row's own generator, on the host (one copy, not a draw launched a row); on float32's
    # grid below 1, so u times the row's total (about 1: rounding) rounds below the total, and the token found is
    # one of positive probability, never one past the last
    u = to_device([generators[i].getrandbits(U_BITS) / 2**U_BITS for i in sampled], device, cdf.dtype)  # (r,)
    choice = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)  # (r,)
    if chosen is None:
        return choice
    tokens[chosen] = choice
    return tokens


def _tempered(scores: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """scores: (r, V) logits, temperature (r, 1) float32, each finite and at least SMALLEST_TEMPERATURE. Returns
    a new float32 tensor of them shifted so that each row's largest is 0, then divided by their row's
    temperature: every such temperature gives 0 for the largest and finite or -inf values for the rest, never
    inf - inf, 0 / 0 or -inf / inf. A temperature just above 0 is thus greedy (the largest logits share all the
    probability) rather than NaN, which the inverse CDF would read as the last token."""
    scores = scores.float()
    return (scores - scores.amax(dim=-1, keepdim=True)).div_(temperature)


def _filter(scores: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float], min_p: Sequence[float]) -> None:
    """scores: (r, V), each row's largest 0 (`_tempered`), and each row's top_k, top_p and min_p. Sets to -inf,
    in place, in each row every token less likely than min_p times the most likely one, outside the top k (ties
    with the k-th all stay), and outside the smallest set of most likely tokens whose probability reaches top_p
    (the most likely token always stays)."""
    device, vocab = scores.device, scores.shape[-1]
    if any(p > 0 for p in min_p):  # p / p_max = exp(score - 0)
        floor = to_device([math.log(p) if p > 0 else -math.inf for p in min_p], device, scores.dtype)
        scores.masked_fill_(scores < floor[:, None], float("-inf"))
    if any(0 < k < vocab for k in top_k):
        largest = scores.topk(max(k for k in top_k if 0 < k < vocab), dim=-1).values  # (r, K), descending
        kth = largest.gather(-1, to_device([k - 1 if 0 < k < vocab else 0 for k in top_k], device)[:, None])  # (r, 1)
        kth.masked_fill_(to_device([not 0 < k < vocab for k in top_k], device)[:, None], float("-inf"))  # keep all
        scores.masked_fill_(scores < kth, float("-inf"))
    if any(p < 1.0 for p in top_p):
        limit = to_device([p if p < 1.0 else math.inf for p in top_p], device, scores.dtype)  # (r,)
        probs = torch.softmax(scores, dim=-1)  # (r, V)
        among = vocab
        if device.type == "cpu":  # (reading a count from the device would wait for it)
            # the tokens less likely than (1 - limit) / V hold less than 1 - limit together: no nucleus reaches them
            floor = to_device([(1 - p) / vocab if p < 1.0 else math.inf for p in top_p], device, scores.dtype)
            among = max(1, int((probs >= floor[:, None]).sum(dim=-1).max()))
        scores.masked_fill_(~_nucleus(probs, limit, among), float("-inf"))


def _nucleus(probs: torch.Tensor, limit: torch.Tensor, among: int) -> torch.Tensor:
    """probs: (r, V), limit (r,) (inf: no limit), `among`: how many of each row's most likely tokens hold its
    nucleus at most. Returns (r, V) bool: each row's nucleus, the smallest set of its most likely tokens whose
    probability reaches its limit, tokens of equal probability ranked by id (as a stable sort ranks them). Only
    the values of the `among` most likely tokens are ranked (a CPU sorts a whole vocabulary slowly); a row's
    answer does not depend on how many that is."""
    if among < probs.shape[-1]:
        values = probs.topk(among, dim=-1).values  # (r, a), descending
    else:
        values = probs.sort(dim=-1, descending=True).values  # (r, V)
    inside = values.cumsum(dim=-1) - values < limit[:, None]  # (r, a): the mass ranked above each is below the limit
    inside[:, 0] = True  # the most likely token stays, also where a tiny top_p rounds to 0 in float32
    cut = values.gather(-1, inside.sum(dim=-1, keepdim=True) - 1)  # (r, 1): the least likely kept value
    ties = (inside & (values == cut)).sum(dim=-1, keepdim=True)  # (r, 1): how many of the cut's value are kept
    at_cut = probs == cut  # (r, V)
    kept = (probs > cut) | (at_cut & (at_cut.cumsum(dim=-1) <= ties)) | limit.isinf()[:, None]  # (r, V)
    if among < probs.shape[-1]:  # a row whose last candidate is kept may keep more (rounding): it ranks them all
        further = (inside[:, -1] & limit.isfinite()).nonzero().squeeze(-1)  # (f,)
        if len(further):
            kept[further] = _nucleus(probs[further], limit[further], probs.shape[-1])
    return kept


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
