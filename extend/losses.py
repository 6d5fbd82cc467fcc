"""What calibration minimises, computed so that a step's batch can be split over ranks and micro-batches.

- language modelling: the mean NLL of the step's text windows;
- passkey: the mean answer cross-entropy of the step's samples, plus — with a perplexity weight — a hinge per
  text domain, weight · Σ_domains max(0, mean excess NLL of its windows over identity − log(1 + slack)).

Both are sums of per-item terms over counts, and the hinge a function of per-domain means, so each rank takes
every world-size-th item (extend.distributed), runs them a micro-batch at a time, and the sums are all-reduced:
the loss and its gradient are those of the whole batch at once, whatever the split. The hinge's gradient is its
gate (the domain's mean excess over the slack, known once the ranks' sums are in: a first pass without
gradients) times the mean excess's gradient (a second pass over the gated domains' windows only).

Each objective draws the whole batch of step k from its own seed, the same on every rank, so the two
evaluations of one SPSA step see the same text, and a run is reproducible.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from runtime import MambaLM, ScaleSet
from runtime.tokenizer import Tokenizer

from . import distributed
from .objectives import lm_nll, passkey_scores
from .passkey import PasskeyBatch, Template, make_batch
from .sources import Mixture
from .tokens import TokenSource

ScaleFactory = Callable[[], ScaleSet]  # a scale set built anew for each micro-batch's graph


@dataclass
class Objective:
    """A calibration loss. `loss(scale_set, step)`: the whole step's batch at once, a differentiable scalar (the
    reference). `run(make_scales, step, backward)`: the loss's value, and with `backward` this rank's share of
    its gradient accumulated into the scales' leaves (the shares sum to the gradient over the ranks); `split`,
    where given, runs the step split over ranks and micro-batches, else the whole loss is taken on every rank."""

    name: str
    length: int
    loss: Callable[[ScaleSet | None, int], torch.Tensor]
    split: Callable[[ScaleFactory, int, bool], float] | None = None

    def run(self, make_scales: ScaleFactory, step: int, backward: bool) -> float:
        if self.split is not None:
            return self.split(make_scales, step, backward)
        loss = self.loss(make_scales(), step)
        if backward:
            (loss / distributed.world_size()).backward()  # every rank computed all of it
        return loss.item()


def _chunks(count: int, micro_batch: int | None) -> list[list[int]]:
    """This rank's rows of `count` (every world-size-th), in micro-batches of at most `micro_batch`."""
    rows = list(distributed.shard(range(count)))
    size = micro_batch or max(1, len(rows))
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def _mean_over_ranks(local_sum: torch.Tensor, count: int) -> float:
    return distributed.sum_across(local_sum.detach().double().clone()).item() / count


def _mean_nll(model: MambaLM, windows: torch.Tensor, make_scales: ScaleFactory, checkpoint: bool,
              micro_batch: int | None, backward: bool, weight: float = 1.0) -> float:
    """weight · mean NLL of `windows` (n, L) over all ranks; with `backward`, its gradient (this rank's share)."""
    local = torch.zeros((), dtype=torch.float64)
    for rows in _chunks(len(windows), micro_batch):
        part = weight * lm_nll(model, windows[rows], make_scales(), checkpoint).sum() / len(windows)
        if backward:
            part.backward()
        local += part.detach().double().cpu()
    return _mean_over_ranks(local, 1)


def language_model_objective(model: MambaLM, source: TokenSource | Mixture, length: int, batch_size: int, seed: int,
                             checkpoint: bool = True, micro_batch: int | None = None) -> Objective:
    def draw(step: int) -> torch.Tensor:
        return source.batch(length, batch_size, random.Random(f"{seed}:{step}"))  # (batch, length)

    def loss(scale_set: ScaleSet | None, step: int) -> torch.Tensor:
        return lm_nll(model, draw(step), scale_set, checkpoint).mean()

    def split(make_scales: ScaleFactory, step: int, backward: bool) -> float:
        return _mean_nll(model, draw(step), make_scales, checkpoint, micro_batch, backward)

    return Objective("ppl", length, loss, split)


def passkey_objective(model: MambaLM, tokenizer: Tokenizer, haystack, length: int, batch_size: int, seed: int,
                      checkpoint: bool = True, text: TokenSource | Mixture | None = None, ppl_weight: float = 0.0,
                      ppl_slack: float = 0.02, templates: list[Template] | None = None,
                      micro_batch: int | None = None) -> Objective:
    """Answer cross-entropy of samples in `templates` (default: the trained one), plus — when `ppl_weight` > 0 —
    the hinge for each domain of `text` apart (a Mixture's text domains; a TokenSource is one), on windows of the
    same length.

    Retrieval alone is repaired by scales that cost perplexity badly; the hinge lets scales move freely while
    perplexity stays within the slack, and pushes back hard beyond it. It holds per domain because a mean over
    domains lets the scales trade one domain's perplexity for another's, and the held-out rule judges each."""
    slack = math.log1p(ppl_slack)
    if ppl_weight and text is None:
        raise ValueError("the perplexity hinge (ppl_weight > 0) needs text")
    hinged = text if ppl_weight else None  # the text the hinge holds; None: no hinge

    def draw(step: int) -> tuple[PasskeyBatch, dict[str, torch.Tensor]]:
        rng = random.Random(f"{seed}:{step}")
        batch = make_batch(tokenizer, length, batch_size, rng, haystack, [rng.random() for _ in range(batch_size)],
                           templates)
        if hinged is None:
            return batch, {}
        count = max(1, batch_size // 4)
        return batch, hinged.batches(length, count, rng) if isinstance(hinged, Mixture) else {
            "text": hinged.batch(length, count, rng)}  # domain -> (count, length)

    def loss(scale_set: ScaleSet | None, step: int) -> torch.Tensor:
        batch, domains = draw(step)
        total = passkey_scores(model, batch, scale_set, checkpoint)[0].mean()
        for windows in domains.values():
            with torch.no_grad():
                reference = lm_nll(model, windows, None).mean()
            total = total + ppl_weight * torch.relu(lm_nll(model, windows, scale_set, checkpoint).mean() - reference
                                                    - slack)
        return total

    def split(make_scales: ScaleFactory, step: int, backward: bool) -> float:
        batch, domains = draw(step)
        n = len(batch.tokens)
        local = torch.zeros((), dtype=torch.float64)
        for rows in _chunks(n, micro_batch):
            part = passkey_scores(model, batch.rows(rows), make_scales(), checkpoint)[0].sum() / n
            if backward:
                part.backward()
            local += part.detach().double().cpu()
        total = _mean_over_ranks(local, 1)
        for windows in domains.values():  # (count, length) each
            with torch.no_grad():
                excess = torch.zeros((), dtype=torch.float64)
                for rows in _chunks(len(windows), micro_batch):
                    excess += (lm_nll(model, windows[rows], make_scales(), checkpoint)
                               - lm_nll(model, windows[rows], None)).sum().double().cpu()
            over = _mean_over_ranks(excess, len(windows)) - slack
            if over > 0:  # the gate is open: the hinge's gradient is the mean excess's
                total += ppl_weight * over
                if backward:
                    _mean_nll(model, windows, make_scales, checkpoint, micro_batch, True, ppl_weight)
        return total

    return Objective("passkey", length, loss, split)
