"""A DeciMamba (`decimate`) bank entry: nothing is calibrated; the decimating layer is chosen by a sweep.

For one bucket: score every candidate layer, decimating at the bucket's length, on the calibration
documents with the task's metrics, and take the best (`scoring.best_variant`); then score it and identity
on the held-out documents and keep the better (`scoring.choose`), so the entry never makes the model worse
than identity. Perplexity is scored on the last `keep_last` tokens of each window, the positions a decimated
prompt keeps in place, for identity too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from runtime import Decimation, MambaLM

from .scoring import HeldOut, best_variant, choose, score


@dataclass
class DecimateResult:
    decimation: Decimation  # the sweep's best layer
    chosen: str  # "calibrated" (the best layer beat identity on held-out data) or "identity"
    metrics: dict[str, dict[str, float]]  # held-out: {"identity": ..., "calibrated": ...}
    sweep: dict[str, dict[str, float]]  # on the calibration documents: {"identity" or layer index: metrics}


def sweep_and_choose(model: MambaLM, task: str, length: int, layers: list[int], template: Decimation,
                     calibration: HeldOut, held_out: HeldOut) -> DecimateResult:
    """`template` holds l_base, min_len and keep_last; its layer is replaced by each of `layers`."""
    tail = template.keep_last
    variants = {layer: dataclasses.replace(template, layer=layer) for layer in layers}
    identity = score(model, task, length, None, calibration, ppl_tail=tail)
    swept = {layer: score(model, task, length, None, calibration, spec, tail) for layer, spec in variants.items()}
    best = variants[best_variant(task, swept, identity)]
    metrics = {"identity": score(model, task, length, None, held_out, ppl_tail=tail),
               "calibrated": score(model, task, length, None, held_out, best, tail)}
    sweep = {"identity": identity, **{str(layer): m for layer, m in swept.items()}}
    return DecimateResult(best, choose(task, metrics), metrics, sweep)
