"""Scoring candidate scale sets on held-out data, and choosing the one a bank entry keeps.

A bank must never make its model worse than identity on held-out data (DESIGN.md §4, FINDINGS.md 1):
identity is always a candidate, and for the passkey task a candidate whose held-out perplexity exceeds
identity's by more than PPL_TOLERANCE is not eligible, however well it retrieves. The same rule, without
identity as a candidate, picks the best of several variants of one method (DeciMamba's layer sweep).
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime import Decimation, MambaLM, ScaleSet
from runtime.tokenizer import Tokenizer

from .objectives import passkey_accuracy, perplexity
from .tokens import TokenSource

PPL_TOLERANCE = 1.05


@dataclass
class HeldOut:
    """What scoring reads: documents (the held-out ones; the calibration ones for a sweep), a passkey haystack
    from them, and the sample budget."""

    source: TokenSource
    tokenizer: Tokenizer
    haystack: object  # callable (length, rng) -> token ids
    samples: int
    seed: int
    batch_size: int = 1


def score(model: MambaLM, task: str, length: int, scale_set: ScaleSet | None, held_out: HeldOut,
          decimation: Decimation | None = None, ppl_tail: int | None = None) -> dict[str, float]:
    """{"ppl"} for the ppl task; {"passkey_acc", "passkey_ce", "ppl"} for passkey. `ppl_tail`: perplexity of
    the last that many tokens of each window (what a decimated prompt can be scored on)."""
    ppl = perplexity(model, held_out.source, length, held_out.samples, scale_set, held_out.seed, held_out.batch_size,
                     decimation, ppl_tail)
    if task == "ppl":
        return {"ppl": ppl}
    accuracy, ce = passkey_accuracy(model, held_out.tokenizer, held_out.haystack, length, held_out.samples,
                                    scale_set, held_out.seed, held_out.batch_size, decimation)
    return {"passkey_acc": accuracy, "passkey_ce": ce, "ppl": ppl}


def _merit(task: str, metrics: dict[str, float]) -> tuple[float, ...]:
    """Larger is better: perplexity for the ppl task; retrieval, then answer cross-entropy, for passkey."""
    return (-metrics["ppl"],) if task == "ppl" else (metrics["passkey_acc"], -metrics["passkey_ce"])


def _within_tolerance(task: str, metrics: dict[str, float], identity: dict[str, float]) -> bool:
    return task == "ppl" or metrics["ppl"] <= identity["ppl"] * PPL_TOLERANCE


def choose(task: str, metrics: dict[str, dict[str, float]]) -> str:
    """The best of `metrics` ({"identity": ..., "previous": ..., "calibrated": ...}); identity on ties."""
    eligible = [name for name, m in metrics.items() if _within_tolerance(task, m, metrics["identity"])]
    return max(eligible, key=lambda name: (*_merit(task, metrics[name]), name == "identity"))


def best_variant(task: str, variants: dict, identity: dict[str, float]):
    """The key of the best of `variants` ({key: metrics}), identity not among them: the best within the
    perplexity tolerance of `identity`, or of them all when none is within it; the first on ties."""
    eligible = [key for key, m in variants.items() if _within_tolerance(task, m, identity)] or list(variants)
    return max(eligible, key=lambda key: _merit(task, variants[key]))
