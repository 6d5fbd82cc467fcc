"""Recurrent state of a batch of sequences. The model holds none: callers own states (or a pool of them).

Per layer: `conv` holds the last k-1 inputs of the causal convolution (b, c, k-1) in the model's dtype;
`ssm` holds the SSM state, (b, d, n) for Mamba1 and (b, h, p, n) for Mamba2, in float32, or in a narrower dtype
where a state pool asks for one (vLLM's mamba_ssm_cache_dtype): the steps then compute in float32 from the
stored values and round once as they store, as mamba_ssm's own decode does with bfloat16 states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .config import MAMBA1, ModelConfig


@dataclass
class InferenceState:
    conv: list[torch.Tensor]  # per layer (b, conv_dim, d_conv - 1)
    ssm: list[torch.Tensor]  # per layer (b, d_inner, d_state) or (b, nheads, headdim, d_state), float32 or `ssm_dtype`

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, device: torch.device | str, dtype: torch.dtype,
              ssm_dtype: torch.dtype = torch.float32) -> InferenceState:
        ssm_shape: tuple[int, ...]
        if config.arch == MAMBA1:
            ssm_shape = (batch, config.d_inner, config.d_state)
        else:
            ssm_shape = (batch, config.nheads, config.headdim, config.d_state)
        conv_shape = (batch, config.conv_dim, config.d_conv - 1)
        return cls(
            [torch.zeros(conv_shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
            [torch.zeros(ssm_shape, device=device, dtype=ssm_dtype) for _ in range(config.n_layer)],
        )

    @property
    def batch(self) -> int:
        return self.ssm[0].shape[0]

    def rows(self, index: torch.Tensor | list[int]) -> InferenceState:
        """A copy of the states of the sequences at `index` (a gather: the pool is not aliased)."""
        rows = torch.as_tensor(index, device=self.ssm[0].device)
        return InferenceState([t.index_select(0, rows) for t in self.conv], [t.index_select(0, rows) for t in self.ssm])

    def write_rows(self, index: torch.Tensor | list[int], source: InferenceState) -> None:
        """Copies `source`'s sequences into the rows at `index`."""
        rows = torch.as_tensor(index, device=self.ssm[0].device)
        for mine, theirs in zip(self.conv + self.ssm, source.conv + source.ssm):
            mine.index_copy_(0, rows, theirs.to(mine.dtype))

    def clone(self) -> InferenceState:
        return InferenceState([t.clone() for t in self.conv], [t.clone() for t in self.ssm])

    @classmethod
    def cat(cls, states: list[InferenceState]) -> InferenceState:
        return cls(
            [torch.cat(layer) for layer in zip(*(s.conv for s in states))],
            [torch.cat(layer) for layer in zip(*(s.ssm for s in states))],
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.conv + self.ssm)


@dataclass
class PoolRows:
    """Rows of a state pool as one batch's state, layer by layer: a prefill reads a layer's rows just before the
    layer runs and writes its new state into them as soon as it is done, so the batch's states of every layer
    never exist at once beside the pool's (they are large: float32, per layer and prompt of a batched prefill)."""

    pool: InferenceState
    rows: torch.Tensor  # (b,) the pool rows of the batch's sequences
    fresh: torch.Tensor | None  # (b,) bool: the sequences that start from a zero state; None: every one does

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The layer's (conv, ssm) states of the batch, a copy (the fresh sequences' zeroed), or None when every
        sequence starts from zero: no state rather than a zero one, since a scan from a state does more work."""
        if self.fresh is None:
            return None
        conv = self.pool.conv[layer].index_select(0, self.rows)
        ssm = self.pool.ssm[layer].index_select(0, self.rows).float()  # the scans start from float32 states
        # a mask rather than the fresh rows' indices: its shape is the batch's, whatever the count (captured graphs)
        for t in (conv, ssm):
            t.masked_fill_(self.fresh.view(-1, *[1] * (t.dim() - 1)), 0)
        return conv, ssm

    def write(self, layer: int, conv: torch.Tensor, ssm: torch.Tensor) -> None:
        self.pool.conv[layer].index_copy_(0, self.rows, conv.to(self.pool.conv[layer].dtype))
        self.pool.ssm[layer].index_copy_(0, self.rows, ssm.to(self.pool.ssm[layer].dtype))


class MixerOutput(NamedTuple):
    """A mixer's prefill of one layer."""

    out: torch.Tensor  # (b, l, D)
    state: tuple[torch.Tensor, torch.Tensor]  # the layer's new conv (b, conv_dim, k-1) and ssm state
    delta: torch.Tensor | None  # (b, l, c) float32 Δ as the scan uses it, when asked for (what decimation ranks by)
