"""Prefill steps of short chunks as captured CUDA graphs: one graph per (padded batch, padded chunk length, scale
fields present), replayed per step.

A burst of users' short prompts is prefilled in steps whose GPU work is small (the short-chunk kernels,
runtime.ops.triton_short_conv and triton_short_scan) and whose launches, from Python, cost far more: 20 and more
operations a layer, every layer. A captured graph replays them all at once, as decode's graphs do
(runtime.decode_graph).

Everything a graph touches has a fixed address: the state pool, the scale rows (graph_capture.StaticScales, shared
with the decode graphs) and one static input block (Bmax, Lmax + 3) int64 that `run` fills with one copy: row i holds
sequence i's chunk padded with zeros to Lmax, then its length, its slot and whether it starts from a zero state.
The graph of (B, L) prefills the block's first B rows, padded on the right to L (exact: runtime.padding), over the
pool's rows (MambaLM.prefill_rows), and leaves each row's final-normed hidden state at its last real position,
(B, D) float32, in its output.

A batch of b chunks of at most c tokens runs in the graph of the smallest captured B ≥ b and L ≥ c; its B − b
padding rows read and write the pool's scratch row (the decode graphs' too) with one token, from a zero state and
identity scales, and their outputs are ignored. The scans stop each row at its own end, but the projections
multiply every padded position: the batch sizes lie closer than decode's powers of two (`prefill_graph_sizes`).
Chunks of up to SHORT_CHUNK tokens only: the short-chunk kernels
take every sequence's state and scales in one launch, where the long-chunk path launches once per scale set, a
count a graph cannot follow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .device_copy import to_device
from .graph_capture import MemoryPool, ScaleFields, StaticScales, capture, scale_fields, size_for
from .model import MambaLM
from .ops.launch_classes import SHORT_CHUNK
from .padding import Padding, pads_exactly
from .scales import BatchScales
from .state import InferenceState, PoolRows

LENGTH_STEP = 16  # the captured chunk lengths: multiples of it up to SHORT_CHUNK (Triton's kernels specialise on it)
# The captured batch sizes: 1, 2, 4, then every FINE_ROWS rows up to FINE_PAST (a burst of requests arriving over a
# few milliseconds splits into steps of any size there), every COARSE_ROWS past it
FINE_ROWS, FINE_PAST, COARSE_ROWS = 8, 64, 32


def graph_lengths() -> list[int]:
    """The padded chunk lengths prefill graphs are captured for (none when the short-chunk kernels are off)."""
    return list(range(LENGTH_STEP, SHORT_CHUNK + 1, LENGTH_STEP))


def prefill_graph_sizes(max_batch: int) -> list[int]:
    """The batch sizes prefill graphs are captured for, up to max_batch and max_batch itself."""
    steps = (*range(FINE_ROWS, FINE_PAST + 1, FINE_ROWS), *range(FINE_PAST + COARSE_ROWS, max_batch, COARSE_ROWS))
    return [size for size in (1, 2, 4, *steps) if size < max_batch] + [max_batch]


def prefills_in_graphs(model: MambaLM) -> bool:
    """Whether short prefill steps of `model` can run as graphs: on CUDA, rows padded exactly, short kernels on."""
    return model.device.type == "cuda" and pads_exactly(model.config) and bool(graph_lengths())


def input_block(chunks: list[list[int]], slots: list[int], firsts: list[bool], width: int, scratch: int,
                size: int) -> list[list[int]]:
    """The rows of a static input block for b ≤ `size` chunks of at most `width` tokens: each chunk padded with
    zeros to `width`, then its length, its slot and whether it starts from zeros; then size − b pad rows of one
    token on the `scratch` slot, from zeros."""
    pad_row = [0] * width + [1, scratch, 1]
    return [chunk + [0] * (width - len(chunk)) + [len(chunk), slot, first]
            for chunk, slot, first in zip(chunks, slots, firsts)] + [pad_row] * (size - len(chunks))


def prefill_block(model: MambaLM, pool: InferenceState, block: torch.Tensor, length: int,
                  scales: BatchScales | None) -> torch.Tensor:
    """The prefill of an input block's rows (`input_block`: block (B, W + 3) int64 on the device), their chunks
    padded on the right to `length` ≤ W, over the pool's rows. Returns each row's final-normed hidden state at
    its chunk's last token (B, D) float32. What a graph captures: shapes fixed by B and `length` alone."""
    width = block.shape[1] - 3
    tokens, ends = block[:, :length], block[:, width]  # (B, L), (B,)
    rows = PoolRows(pool, block[:, width + 1], block[:, width + 2] != 0)
    padding = Padding.at(ends, length, model.config.d_conv)
    hidden = model.prefill_rows(tokens, rows, scales, padding=padding)  # (B, L, D)
    return hidden[torch.arange(block.shape[0], device=hidden.device), ends - 1]  # (B, D)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    last: torch.Tensor  # (B, D) float32: the graph's output, overwritten by every replay


class PrefillGraphs:
    """CUDA-graph prefill of short chunks over `pool`, whose last row is scratch; graphs of B × L above
    `max_tokens` (a step's prompt-token budget) are never needed and not captured."""

    def __init__(self, model: MambaLM, pool: InferenceState, scales: StaticScales, memory_pool: MemoryPool,
                 max_tokens: int) -> None:
        assert prefills_in_graphs(model), "prefill graphs need CUDA, exact padding and the short-chunk kernels"
        self.model = model
        self.pool = pool
        self.scratch = pool.batch - 1
        self.lengths = graph_lengths()
        self.sizes = prefill_graph_sizes(min(pool.batch - 1, max_tokens // LENGTH_STEP))
        self.max_tokens = max_tokens
        self.width = self.lengths[-1]  # Lmax: the block's columns of tokens
        self.inputs = torch.zeros(self.sizes[-1], self.width + 3, dtype=torch.long, device=model.device)
        self.scales = scales
        self.memory_pool = memory_pool
        self.graphs: dict[tuple[int, int, bool, bool], _Graph] = {}  # (B, L, has delta, has a) -> its graph

    def takes(self, batch: int, longest: int) -> bool:
        """Whether a step of `batch` chunks of at most `longest` tokens has a graph."""
        return self._shape(batch, longest) is not None

    def capture(self, fields: list[ScaleFields]) -> None:
        """Captures the graph of every batch size and chunk length within the budget for each combination of scale
        fields not yet captured."""
        for has_delta, has_a in fields:
            for length in self.lengths:
                for size in self.sizes:
                    if size * length <= self.max_tokens and (size, length, has_delta, has_a) not in self.graphs:
                        self.graphs[size, length, has_delta, has_a] = self._capture(size, length, (has_delta, has_a))

    def run(self, chunks: list[list[int]], slots: list[int], firsts: list[bool],
            scales: BatchScales | None) -> torch.Tensor:
        """One prompt chunk for each of b sequences (`takes` them), from the state of its slot, or from zeros where
        `first`; the pool's rows advance to each chunk's end. Returns each row's final-normed hidden state at its
        chunk's last token (b, D) float32: a view of the graph's output, valid until the next call."""
        b = len(chunks)
        shape = self._shape(b, max(len(chunk) for chunk in chunks))
        assert shape is not None, "a step the graphs take"
        size, length = shape
        block = input_block(chunks, slots, firsts, self.width, self.scratch, size)
        self.inputs[:size].copy_(to_device(block, self.model.device, torch.long))  # (B, Lmax + 3)
        self.scales.fill(scales, b, size)
        fields = scale_fields(scales)
        key = (size, length, *fields)
        if key not in self.graphs:
            self.graphs[key] = self._capture(size, length, fields)
        captured = self.graphs[key]
        captured.graph.replay()
        return captured.last[:b]

    def _shape(self, batch: int, longest: int) -> tuple[int, int] | None:
        """The (B, L) of the graph a step of `batch` chunks of at most `longest` tokens runs in, if any."""
        if batch > self.sizes[-1] or longest > self.width:
            return None
        size = size_for(self.sizes, batch)
        length = next(length for length in self.lengths if length >= longest)
        return (size, length) if size * length <= self.max_tokens else None

    def _body(self, size: int, length: int, fields: ScaleFields) -> torch.Tensor:
        """The prefill of the static block's first `size` rows padded to `length`. Returns (size, D)."""
        return prefill_block(self.model, self.pool, self.inputs[:size], length, self.scales.view(size, fields))

    def _capture(self, size: int, length: int, fields: ScaleFields) -> _Graph:
        # Warm-up runs prefill pad rows (one token on the scratch row, from zeros): the real rows are untouched
        idle = torch.tensor(input_block([], [], [], self.width, self.scratch, size), device=self.inputs.device)
        graph, last = capture(lambda: self._body(size, length, fields), self.memory_pool, self.inputs[:size], idle)
        return _Graph(graph, last)
