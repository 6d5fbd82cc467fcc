"""What calibration (extend.losses) and evaluation measure, for a model under a scale set.

- language modelling: mean token negative log-likelihood of windows of the bucket length;
- passkey: cross-entropy of the answer tokens, and whether every answer token is the greedy choice.

Under a decimation (DeciMamba) only the last `keep_last` positions of a prompt keep their place, so the
metrics score those: the answer of a passkey sample must lie within them, and language modelling scores
the last `tail` tokens of each window (identity is then scored on the same tail, to compare like with like).
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from runtime import Decimation, MambaLM, ScaleSet, batch_scales
from runtime.tokenizer import Tokenizer

from . import distributed
from .passkey import PasskeyBatch, Template, make_batch
from .sources import Mixture
from .tokens import TokenSource


def _scales(model: MambaLM, scale_set: ScaleSet | None, batch: int):
    return batch_scales([scale_set] * batch, model.config, model.device)


def _last_hidden(model: MambaLM, inputs: torch.Tensor, scale_set: ScaleSet | None, checkpoint: bool,
                 decimation: Decimation | None, tail: int | None) -> torch.Tensor:
    """inputs: (b, l). Hidden states (b, t, D) of the last t = `tail` positions (None: all of them, or the
    `keep_last` that a decimation which drops positions keeps in place)."""
    hidden = model.hidden_states_only(inputs, scales=_scales(model, scale_set, len(inputs)), checkpoint=checkpoint,
                                      decimation=decimation)  # (b, k ≤ l, D)
    if decimation is not None and hidden.shape[1] < inputs.shape[1]:  # the positions before keep_last moved
        tail = decimation.keep_last if tail is None else tail
        if tail > decimation.keep_last:
            raise ValueError(f"scoring the last {tail} positions of a decimated prompt, which keeps only its last "
                             f"{decimation.keep_last} in place: raise keep_last or score fewer")
    return hidden if tail is None else hidden[:, -tail:]


def lm_nll(model: MambaLM, tokens: torch.Tensor, scale_set: ScaleSet | None, checkpoint: bool = False,
           decimation: Decimation | None = None, tail: int | None = None) -> torch.Tensor:
    """tokens: (b, L). Mean NLL of tokens 1..L-1 given their prefixes, per sequence: (b,) float32; with
    `tail`, of the last `tail` tokens only (under a decimation that drops positions, its last keep_last)."""
    tokens = tokens.to(model.device)
    hidden = _last_hidden(model, tokens[:, :-1], scale_set, checkpoint, decimation, tail)  # (b, t, D)
    targets = tokens[:, tokens.shape[1] - hidden.shape[1]:]  # (b, t): the token after each of those positions
    return -model.token_logprobs(hidden, targets, checkpoint=checkpoint).mean(dim=1)


def passkey_scores(model: MambaLM, batch: PasskeyBatch, scale_set: ScaleSet | None, checkpoint: bool = False,
                   decimation: Decimation | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: mean cross-entropy of the answer tokens (b,), and retrieved (b,) bool."""
    batch = batch.to(model.device)
    b = len(batch.tokens)
    hidden = _last_hidden(model, batch.tokens[:, :-1], scale_set, checkpoint, decimation, None)  # (b, t, D)
    mask = batch.answer_mask[:, 1:]  # (b, L-1): positions whose next token is an answer token
    scored = mask.shape[1] - hidden.shape[1]  # first position `hidden` holds
    if mask[:, :scored].any():
        raise ValueError(f"the answer starts before the last {hidden.shape[1]} positions, the ones a decimated "
                         f"prompt keeps in place: raise keep_last")
    mask = mask[:, scored:]  # (b, t)
    rows = mask.nonzero()[:, 0]  # (a,) sample of each answer token
    logits = model.logits(hidden[mask])  # (a, V): only the answer positions, never (L, V)
    targets = batch.tokens[:, 1 + scored:][mask]  # (a,)
    ce = F.cross_entropy(logits, targets, reduction="none")  # (a,)
    counts = mask.sum(1)  # (b,)
    loss = torch.zeros(b, device=ce.device).index_add(0, rows, ce) / counts
    misses = torch.zeros(b, device=ce.device).index_add(0, rows, (logits.argmax(-1) != targets).float())
    return loss, misses == 0


@torch.no_grad()
def perplexity(model: MambaLM, source: TokenSource | Mixture, length: int, samples: int, scale_set: ScaleSet | None,
               seed: int, batch_size: int = 1, decimation: Decimation | None = None, tail: int | None = None) -> float:
    """exp of the mean NLL over `samples` windows of `length` tokens drawn with `seed` (of the last `tail`
    tokens of each, with `tail`). Under torchrun each rank scores every world-size-th batch of them."""
    rng = random.Random(f"ppl:{seed}:{length}")
    windows = source.batch(length, samples, rng)  # (samples, length), the same on every rank
    total = torch.zeros((), dtype=torch.float64)
    for i in distributed.shard(range(0, samples, batch_size)):
        nll = lm_nll(model, windows[i:i + batch_size], scale_set, decimation=decimation, tail=tail)  # (b,)
        total += nll.double().sum().cpu()
    return math.exp(distributed.sum_across(total).item() / samples)


def passkey_samples(tokenizer: Tokenizer, haystack, length: int, samples: int, seed: int,
                    template: Template | None = None) -> PasskeyBatch:
    """The samples `passkey_accuracy` scores: `samples` of `length` tokens at depths spread over 0-100%, in
    `template` (default: the trained one), drawn from `seed` and the length alone."""
    return make_batch(tokenizer, length, samples, random.Random(f"passkey:{seed}:{length}"), haystack,
                      templates=[template] if template else None)


@torch.no_grad()
def passkey_accuracy(model: MambaLM, tokenizer: Tokenizer, haystack, length: int, samples: int,
                     scale_set: ScaleSet | None, seed: int, batch_size: int = 1,
                     decimation: Decimation | None = None, template: Template | None = None) -> tuple[float, float]:
    """(fraction retrieved, mean answer cross-entropy) over `samples` samples at depths spread over 0-100%,
    in `template` (default: the trained one). Under torchrun each rank scores every world-size-th batch of them."""
    batch = passkey_samples(tokenizer, haystack, length, samples, seed, template)
    totals = torch.zeros(2, dtype=torch.float64)  # (answer cross-entropy, retrieved) summed over samples
    for i in distributed.shard(range(0, samples, batch_size)):
        loss, hit = passkey_scores(model, batch.rows(list(range(i, min(i + batch_size, samples)))), scale_set,
                                   decimation=decimation)
        totals += torch.stack([loss.double().sum(), hit.double().sum()]).cpu()
    ce, retrieved = (distributed.sum_across(totals) / samples).tolist()
    return retrieved, ce
