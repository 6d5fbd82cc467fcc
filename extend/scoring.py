"""Scoring candidate scale sets on held-out data, and choosing the one a bank entry keeps.

A bank must never make its model worse than identity on held-out data (DESIGN.md §4, FINDINGS.md 1):
identity is always a candidate, and for the passkey task a candidate whose held-out perplexity exceeds
identity's by more than PPL_TOLERANCE is not eligible, however well it retrieves.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime import MambaLM, ScaleSet
from runtime.tokenizer import Tokenizer

from .objectives import passkey_accuracy, perplexity
from .tokens import TokenSource

PPL_TOLERANCE = 1.05


@dataclass
class HeldOut:
    """What scoring reads: the held-out documents, a passkey haystack from them, and the sample budget."""

    source: TokenSource
    tokenizer: Tokenizer
    haystack: object  # callable (length, rng) -> token ids
    samples: int
    seed: int
    batch_size: int = 1


def score(model: MambaLM, task: str, length: int, scale_set: ScaleSet | None, held_out: HeldOut) -> dict[str, float]:
    """{"ppl"} for the ppl task; {"passkey_acc", "passkey_ce", "ppl"} for passkey."""
    ppl = perplexity(model, held_out.source, length, held_out.samples, scale_set, held_out.seed, held_out.batch_size)
    if task == "ppl":
        return {"ppl": ppl}
    accuracy, ce = passkey_accuracy(model, held_out.tokenizer, held_out.haystack, length, held_out.samples,
                                    scale_set, held_out.seed, held_out.batch_size)
    return {"passkey_acc": accuracy, "passkey_ce": ce, "ppl": ppl}


def choose(task: str, metrics: dict[str, dict[str, float]]) -> str:
    """The best of `metrics` ({"identity": ..., "previous": ..., "calibrated": ...}); identity on ties."""
    if task == "ppl":
        return min(metrics, key=lambda name: (metrics[name]["ppl"], name != "identity"))
    limit = metrics["identity"]["ppl"] * PPL_TOLERANCE
    eligible = [name for name, m in metrics.items() if name == "identity" or m["ppl"] <= limit]
    return max(eligible, key=lambda name: (metrics[name]["passkey_acc"], -metrics[name]["passkey_ce"],
                                           name == "identity"))
