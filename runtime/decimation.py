"""DeciMamba's decimation, training-free (Ben-Kish et al., 2024): one layer drops its least important tokens
in the prefill, so the layers after it see a sequence no longer than the one they were trained at.

In the chosen layer the importance of position t is ‖Δ_t‖₂ over channels (Mamba1: d_inner channels;
Mamba2: heads), Δ as the scan uses it (after softplus, clamp and any Δ scale). Of a prompt of L tokens:

- the last R = `keep_last` positions are always kept (they carry the question and the token whose logits
  the prefill returns);
- of the L − R before them, the K with the largest importance are kept, with
  K = max(min(L − R, L_base·β^k), min_len), capped at L − R (DeciMamba's rule; k counts decimating
  layers, and here one layer decimates, so k = 0 and β^k = 1);
- the kept positions keep their original order, so K + R ≤ L positions go on.

The layer runs on the whole prompt (its recurrent state is the full-sequence one); its output's residual
stream is gathered at the kept positions, and the later layers run on that shortened sequence. Decoding
is unchanged: every later token passes through every layer. (DeciMamba's own code gathers inside the
chosen layer, before its scan; gathering after it leaves each mixer untouched.)

Shapes: b batch, l sequence, c importance channels (Mamba1 d_inner, Mamba2 nheads), k kept positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import DecimationError

PARAMS = ("layer", "l_base", "min_len", "keep_last")
# DeciMamba's β shrinks K by β^k in its k-th decimating layer. With one decimating layer k = 0, so a `beta`
# in a bank entry's params (DeciMamba's configs carry one) is checked and changes nothing.
IGNORED_PARAMS = ("beta",)


@dataclass(frozen=True)
class Decimation:
    layer: int  # index of the decimating layer; the layers after it run on the kept positions
    l_base: int  # L_base: tokens the layers after it should see, about the training length
    min_len: int = 0  # never keep fewer than this many of the L − R positions before the tail
    keep_last: int = 1  # R ≥ 1: the last R positions are always kept (the last token's logits are the prefill's)

    def __post_init__(self) -> None:
        for name in PARAMS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise DecimationError(f"decimation {name} must be an integer, got {value!r}")
        if self.layer < 0:
            raise DecimationError(f"decimation layer must be ≥ 0, got {self.layer}")
        if self.l_base < 1:
            raise DecimationError(f"decimation l_base must be ≥ 1, got {self.l_base}")
        if self.min_len < 0:
            raise DecimationError(f"decimation min_len must be ≥ 0, got {self.min_len}")
        if self.keep_last < 1:
            raise DecimationError(f"decimation keep_last must be ≥ 1 (the last token is always kept), "
                                  f"got {self.keep_last}")

    @classmethod
    def from_params(cls, params: dict[str, Any], n_layer: int, default_l_base: int | None = None) -> Decimation:
        """The spec a bank entry's `params` describe, checked against a model of `n_layer` layers; `l_base`
        defaults to `default_l_base` (the model's training length). Raises DecimationError naming the fault."""
        unknown = sorted(set(params) - set(PARAMS) - set(IGNORED_PARAMS))
        if unknown:
            raise DecimationError(f"decimate params: unknown {', '.join(map(repr, unknown))} "
                                  f"(known: {', '.join(PARAMS + IGNORED_PARAMS)})")
        beta = params.get("beta", 1.0)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
            raise DecimationError(f"decimation beta must be a positive number, got {beta!r}")
        if "layer" not in params:
            raise DecimationError("decimate params: 'layer' is missing")
        fields = {name: params[name] for name in PARAMS if name in params}
        if "l_base" not in fields:
            if default_l_base is None:
                raise DecimationError("decimate params: 'l_base' is missing and the model's training length "
                                      "is unknown")
            fields["l_base"] = default_l_base
        spec = cls(**fields)
        spec.check(n_layer)
        return spec

    def check(self, n_layer: int) -> None:
        """Raises DecimationError when a model of `n_layer` layers has no layer `self.layer`."""
        if self.layer >= n_layer:
            raise DecimationError(f"decimation layer {self.layer} does not exist: the model has {n_layer} "
                                  f"layers (0 … {n_layer - 1})")

    def to_params(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in PARAMS}

    def kept_length(self, length: int) -> int:
        """Positions that go on from a prompt of `length` tokens: K + R, at most `length`."""
        tail = min(self.keep_last, length)
        head = length - tail
        return min(head, max(min(head, self.l_base), self.min_len)) + tail

    def drops(self, length: int) -> bool:
        """Whether a prompt of `length` tokens loses any position (else decimation is the identity)."""
        return self.kept_length(length) < length

    def kept_positions(self, delta: torch.Tensor) -> torch.Tensor:
        """delta: (b, l, c), the decimating layer's Δ. Returns the kept positions (b, k) int64, ascending:
        the top K of the first l − R by ‖Δ_t‖₂, then the last R."""
        b, length, _ = delta.shape
        tail = min(self.keep_last, length)
        head = length - tail
        importance = torch.linalg.vector_norm(delta[:, :head].float(), dim=-1)  # (b, l - R)
        top = importance.topk(self.kept_length(length) - tail, dim=1, sorted=False).indices  # (b, K)
        last = torch.arange(head, length, device=delta.device).expand(b, tail)  # (b, R)
        return torch.cat((top.sort(dim=1).values, last), dim=1)  # (b, K + R)
