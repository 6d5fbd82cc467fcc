"""Scoring candidate scale sets on held-out data, and choosing the one a bank entry keeps.

A bank must never make its model worse than identity on held-out data: identity is always a candidate, and
the rule (HELD_OUT_RULE, recorded in each entry) judges every held-out domain apart. The same rule, without
identity as a candidate, picks the best of several variants of one method (DeciMamba's layer sweep).

Metrics are flat {name: number}: "DOMAIN/metric" per domain, and the plain "metric" over all domains (the
mean retrieval and answer cross-entropy; the geometric mean perplexity over the domains that have text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from runtime import Decimation, MambaLM, ScaleSet
from runtime.tokenizer import Tokenizer

from .objectives import passkey_accuracy, perplexity
from .sources import Haystack, Mixture
from .tokens import TokenSource

PPL_TOLERANCE = 1.05
HELD_OUT_RULE = (f"a candidate is eligible only if, on every held-out domain, it retrieves at least as many passkeys "
                 f"as identity and its perplexity is at most {PPL_TOLERANCE}x identity's (task ppl: at most "
                 f"identity's); the eligible candidate with the best retrieval, then answer cross-entropy, over all "
                 f"domains (task ppl: perplexity) is kept, identity on ties")


@dataclass
class HeldOut:
    """What scoring reads: documents (the held-out ones; the calibration ones for a sweep), a passkey haystack
    from them, and the sample budget."""

    source: TokenSource | Mixture | None  # None for a haystack without text (the filler): no perplexity
    tokenizer: Tokenizer
    haystack: Haystack
    samples: int
    seed: int
    batch_size: int = 1


def score(model: MambaLM, task: str, length: int, scale_set: ScaleSet | None, held_out: HeldOut,
          decimation: Decimation | None = None, ppl_tail: int | None = None) -> dict[str, float]:
    """{"ppl"} for the ppl task; {"passkey_acc", "passkey_ce", "ppl"} for passkey ("ppl" only where the held-out
    data has text). `ppl_tail`: perplexity of the last that many tokens of each window (what a decimated prompt
    can be scored on)."""
    metrics = {}
    if held_out.source is not None:
        metrics["ppl"] = perplexity(model, held_out.source, length, held_out.samples, scale_set, held_out.seed,
                                    held_out.batch_size, decimation, ppl_tail)
    if task == "passkey":
        metrics["passkey_acc"], metrics["passkey_ce"] = passkey_accuracy(
            model, held_out.tokenizer, held_out.haystack, length, held_out.samples, scale_set, held_out.seed,
            held_out.batch_size, decimation)
    return metrics


def score_domains(model: MambaLM, task: str, length: int, scale_set: ScaleSet | None,
                  held_out: dict[str, HeldOut]) -> dict[str, float]:
    """score() on every domain, as "DOMAIN/metric", with each metric over all domains under its plain name."""
    per_domain = {name: score(model, task, length, scale_set, data) for name, data in held_out.items()}
    overall = {}
    for metric in ("passkey_acc", "passkey_ce", "ppl"):
        values = [m[metric] for m in per_domain.values() if metric in m]
        if values:
            overall[metric] = (math.exp(sum(map(math.log, values)) / len(values)) if metric == "ppl"
                               else sum(values) / len(values))
    return overall | {f"{name}/{metric}": value for name, m in per_domain.items() for metric, value in m.items()}


def _merit(task: str, metrics: dict[str, float]) -> tuple[float, ...]:
    """Larger is better: perplexity for the ppl task; retrieval, then answer cross-entropy, for passkey."""
    return (-metrics["ppl"],) if task == "ppl" else (metrics["passkey_acc"], -metrics["passkey_ce"])


def _within_tolerance(task: str, metrics: dict[str, float], identity: dict[str, float]) -> bool:
    return task == "ppl" or "ppl" not in metrics or metrics["ppl"] <= identity["ppl"] * PPL_TOLERANCE


def by_domain(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """{"books": {"ppl": ...}, ...} from the "DOMAIN/metric" names; {"": the plain metrics} without any."""
    groups: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        domain, _, metric = key.rpartition("/")
        groups.setdefault(domain, {})[metric] = value
    return {domain: m for domain, m in groups.items() if domain} or groups


def _not_worse(task: str, metrics: dict[str, float], identity: dict[str, float]) -> bool:
    if task == "ppl":
        return metrics["ppl"] <= identity["ppl"]
    return metrics["passkey_acc"] >= identity["passkey_acc"] and _within_tolerance(task, metrics, identity)


def choose(task: str, metrics: dict[str, dict[str, float]]) -> str:
    """The candidate of `metrics` ({"identity": ..., "previous": ..., "calibrated": ...}) that HELD_OUT_RULE
    keeps."""
    identity = by_domain(metrics["identity"])
    eligible = [name for name, m in metrics.items()
                if all(_not_worse(task, values, identity[domain]) for domain, values in by_domain(m).items())]
    return max(eligible, key=lambda name: (*_merit(task, metrics[name]), name == "identity"))


def best_variant(task: str, variants: dict, identity: dict[str, float]):
    """The key of the best of `variants` ({key: metrics}), identity not among them: the best within the
    perplexity tolerance of `identity`, or of them all when none is within it; the first on ties."""
    eligible = [key for key, m in variants.items() if _within_tolerance(task, m, identity)] or list(variants)
    return max(eligible, key=lambda key: _merit(task, variants[key]))
