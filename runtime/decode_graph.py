"""Decode as captured CUDA graphs: one graph per (padded batch size, scale fields present), replayed per token.

A decode step launches hundreds of small kernels (several per layer); launched one by one from Python,
batch-1 decode is bound by launch overhead, not by the GPU. A captured graph replays them all at once.

Everything a graph touches has a fixed address: the state pool (the engine's, never reallocated), and the
static inputs below, which `step` fills before each replay:
  tokens (B,) int64, slots (B,) int64: the rows of the pool each sequence owns;
  per layer, the scale fields of the batch (runtime.graph_capture.StaticScales).
The graph steps the sequences' rows of the pool in place (runtime.MambaLM.step with `slots`, the same maths
as eager decode, scales included; no gather or scatter of rows) and leaves the logits (B, V) in its output.

A batch of b sequences runs in the graph of the smallest captured size B ≥ b (1, 2, 4, 8, … up to the pool);
its B − b padding rows all read and write the pool's last row, a scratch row no request owns, with token 0
and identity scales; what they leave there and their logits are ignored. Graphs are captured by `capture`
(a server does it at start, so that no request waits for one), or else the first time a size and scale
combination is needed; they share one memory pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .graph_capture import MemoryPool, ScaleFields, StaticScales, capture, graph_sizes, scale_fields, size_for
from .model import MambaLM
from .scales import BatchScales
from .state import InferenceState


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # (B, V) float32: the graph's output, overwritten by every replay


class DecodeGraphs:
    """CUDA-graph decode over `pool`, whose last row is scratch: requests own rows 0 … pool.batch − 2. `scales`
    and `memory_pool` may be shared with the prefill graphs (runtime.prefill_graph): one graph replays at a time."""

    def __init__(self, model: MambaLM, pool: InferenceState, scales: StaticScales | None = None,
                 memory_pool: MemoryPool | None = None) -> None:
        assert model.device.type == "cuda", "CUDA graphs need the model on a CUDA device"
        self.model = model
        self.pool = pool
        self.scratch = pool.batch - 1
        self.sizes = graph_sizes(pool.batch - 1)
        biggest, device = self.sizes[-1], model.device
        self.tokens = torch.zeros(biggest, dtype=torch.long, device=device)  # (B,)
        self.slots = torch.full((biggest,), self.scratch, dtype=torch.long, device=device)  # (B,)
        self.scales = scales or StaticScales(model.config, biggest, device)
        self.graphs: dict[tuple[int, bool, bool], _Graph] = {}  # (size, has delta, has a) -> its graph
        self.memory_pool = memory_pool or torch.cuda.graph_pool_handle()

    def capture(self, fields: list[ScaleFields]) -> None:
        """Captures the graph of every batch size for each (has delta, has a) combination not yet captured."""
        for has_delta, has_a in fields:
            for size in self.sizes:
                if (size, has_delta, has_a) not in self.graphs:
                    self.graphs[size, has_delta, has_a] = self._capture(size, (has_delta, has_a))

    def step(self, tokens: torch.Tensor, slots: torch.Tensor, scales: BatchScales | None) -> torch.Tensor:
        """tokens (b,), slots (b,) on the model's device; the pool rows at `slots` advance one token in place.
        Returns the logits (b, V) float32: a view of the graph's output, valid until the next call."""
        b = tokens.shape[0]
        size = size_for(self.sizes, b)
        self.tokens[:b].copy_(tokens)
        self.tokens[b:size].zero_()
        self.slots[:b].copy_(slots)
        self.slots[b:size].fill_(self.scratch)
        self.scales.fill(scales, b, size)
        fields = scale_fields(scales)
        key = (size, *fields)
        if key not in self.graphs:
            self.graphs[key] = self._capture(size, fields)
        captured = self.graphs[key]
        captured.graph.replay()
        return captured.logits[:b]

    def _body(self, size: int, fields: ScaleFields) -> torch.Tensor:
        """One decode step of the static inputs' first `size` rows, in the pool. Returns (size, V)."""
        scales = self.scales.view(size, fields)
        return self.model.step(self.tokens[:size], self.pool, scales, self.slots[:size])  # (size, V)

    def _capture(self, size: int, fields: ScaleFields) -> _Graph:
        # Warm-up steps step the scratch row only; the real rows advance once, in the replay
        idle = torch.full_like(self.slots, self.scratch)
        graph, logits = capture(lambda: self._body(size, fields), self.memory_pool, self.slots, idle)
        return _Graph(graph, logits)
