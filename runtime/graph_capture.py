"""What the captured CUDA graphs of decode (runtime.decode_graph) and of short prefill steps (runtime.prefill_graph)
share: the batch they are captured for padded to a captured size, a batch's scales at fixed addresses, and the
capture itself.

A graph reads its inputs from the addresses it was captured with, so a batch's scales are copied into static rows
before a replay: per layer delta (B, channels) and a (B, d, n) Mamba1 / (B, h) Mamba2, float32, the rows a batch
does not fill holding ones (identity). A graph captured "with delta" reads the first B delta rows of every layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeAlias

import torch

from .config import MAMBA1, ModelConfig
from .scales import BatchScales, LayerScales, ScaleMethod, ScaleSet

if TYPE_CHECKING:  # torch.cuda.graph_pool_handle's type, which torch names privately
    from torch.cuda import _POOL_HANDLE
    MemoryPool: TypeAlias = _POOL_HANDLE
else:
    MemoryPool = tuple

ScaleFields = tuple[bool, bool]  # (has delta, has a): which scale fields a batch's LayerScales carry

WARMUP_STEPS = 2  # eager runs on a side stream before capture: Triton compiles and autotunes its kernels there


def scale_fields(scales: BatchScales | None) -> ScaleFields:
    return scales is not None and scales[0].delta is not None, scales is not None and scales[0].a is not None


def fields_of_batches(scale_sets: Iterable[ScaleSet]) -> list[ScaleFields]:
    """Every scale-field combination a batch of some of `scale_sets` (and identity) makes: a batch holding
    sets of both methods carries both fields."""
    methods = {s.method for s in scale_sets}
    fields = {(False, False)} | {(m is ScaleMethod.DELTA, m is ScaleMethod.A_SPECTRUM) for m in methods}
    if {ScaleMethod.DELTA, ScaleMethod.A_SPECTRUM} <= methods:
        fields.add((True, True))
    return sorted(fields)


def graph_sizes(max_batch: int) -> list[int]:
    """The batch sizes a decode graph is captured for: powers of two up to max_batch, and max_batch itself."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return sizes + [max_batch]


def size_for(sizes: list[int], batch: int) -> int:
    """The smallest of `sizes` (ascending) that holds `batch` sequences."""
    for size in sizes:
        if size >= batch:
            return size
    raise ValueError(f"a batch of {batch} is larger than the graphs' {sizes[-1]} rows")


class StaticScales:
    """The scale rows graphs read, for batches of up to `rows` sequences; refilled only when the batch composition
    (its BatchScales object, which the model runner keeps while the composition repeats) or its size changes."""

    def __init__(self, config: ModelConfig, rows: int, device: torch.device) -> None:
        a_shape = (config.d_inner, config.d_state) if config.arch == MAMBA1 else (config.nheads,)
        self.delta = [torch.ones(rows, config.scale_channels, device=device) for _ in range(config.n_layer)]
        self.a = [torch.ones(rows, *a_shape, device=device) for _ in range(config.n_layer)]
        self._held: tuple[BatchScales, int, int] | None = None  # the scales, batch and graph size now in the rows

    def fill(self, scales: BatchScales | None, b: int, size: int) -> None:
        """Rows 0 … b−1 take the batch's scales and rows b … size−1 identity, unless they hold them already."""
        if scales is None or (self._held is not None and self._held[0] is scales and self._held[1:] == (b, size)):
            return
        self._held = (scales, b, size)
        for layer, delta_rows, a_rows in zip(scales, self.delta, self.a):
            for value, rows in ((layer.delta, delta_rows), (layer.a, a_rows)):
                if value is not None:
                    rows[:b].copy_(value)
                    rows[b:size].fill_(1.0)

    def view(self, size: int, fields: ScaleFields) -> BatchScales | None:
        """The first `size` rows of the fields a graph is captured with, as the layers' scales (None: identity)."""
        has_delta, has_a = fields
        if not (has_delta or has_a):
            return None
        return [LayerScales(delta=delta[:size] if has_delta else None, a=a[:size] if has_a else None)
                for delta, a in zip(self.delta, self.a)]


def capture(body: Callable[[], torch.Tensor], memory_pool: MemoryPool, inputs: torch.Tensor,
            idle: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """A CUDA graph of `body` and the output tensor its replays overwrite. The WARMUP_STEPS eager runs before
    capture really run, so the static `inputs` hold `idle` (values that point every row at the scratch row) while
    they run, and get their values back after; capturing itself runs nothing."""
    real = inputs.clone()
    inputs.copy_(idle)
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(WARMUP_STEPS):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=memory_pool), torch.no_grad():
        output = body()
    inputs.copy_(real)
    return graph, output
