"""Decode as captured CUDA graphs: one graph per (padded batch size, scale fields present), replayed per token.

A decode step launches hundreds of small kernels (several per layer); launched one by one from Python,
batch-1 decode is bound by launch overhead, not by the GPU. A captured graph replays them all at once.

Everything a graph touches has a fixed address: the state pool (the engine's, never reallocated), and the
static inputs below, which `step` fills before each replay:
  tokens (B,) int64, slots (B,) int64: the rows of the pool each sequence owns;
  per layer, the scale fields of the batch: delta (B, channels), a (B, d, n) / (B, h), float32.
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
from collections.abc import Iterable

import torch

from .config import MAMBA1
from .model import MambaLM
from .scales import BatchScales, LayerScales, ScaleMethod, ScaleSet
from .state import InferenceState

ScaleFields = tuple[bool, bool]  # (has delta, has a): which scale fields a batch's LayerScales carry

WARMUP_STEPS = 2  # eager steps on a side stream before capture: Triton compiles and autotunes its kernels there


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
    """The batch sizes a graph is captured for: powers of two up to max_batch, and max_batch itself."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return sizes + [max_batch]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # (B, V) float32: the graph's output, overwritten by every replay


class DecodeGraphs:
    """CUDA-graph decode over `pool`, whose last row is scratch: requests own rows 0 … pool.batch − 2."""

    def __init__(self, model: MambaLM, pool: InferenceState) -> None:
        assert model.device.type == "cuda", "CUDA graphs need the model on a CUDA device"
        self.model = model
        self.pool = pool
        self.scratch = pool.batch - 1
        self.sizes = graph_sizes(pool.batch - 1)
        biggest, config, device = self.sizes[-1], model.config, model.device
        self.tokens = torch.zeros(biggest, dtype=torch.long, device=device)  # (B,)
        self.slots = torch.full((biggest,), self.scratch, dtype=torch.long, device=device)  # (B,)
        a_shape = (config.d_inner, config.d_state) if config.arch == MAMBA1 else (config.nheads,)
        # Static scale fields (identity rows hold ones); a graph captured "with delta" reads delta_rows[i][:B].
        self.delta_rows = [torch.ones(biggest, config.scale_channels, device=device) for _ in range(config.n_layer)]
        self.a_rows = [torch.ones(biggest, *a_shape, device=device) for _ in range(config.n_layer)]
        self.graphs: dict[tuple[int, bool, bool], _Graph] = {}  # (size, has delta, has a) -> its graph
        self._buffered: tuple[BatchScales | None, int] | None = None  # the scales (and rows) now in the buffers
        self.memory_pool = torch.cuda.graph_pool_handle()

    def size_for(self, batch: int) -> int:
        for size in self.sizes:
            if size >= batch:
                return size
        raise ValueError(f"decode batch {batch} is larger than the pool's {self.sizes[-1]} slots")

    def capture(self, fields: list[ScaleFields]) -> None:
        """Captures the graph of every batch size for each (has delta, has a) combination not yet captured."""
        for has_delta, has_a in fields:
            for size in self.sizes:
                if (size, has_delta, has_a) not in self.graphs:
                    self.graphs[size, has_delta, has_a] = self._capture(size, has_delta, has_a)

    def step(self, tokens: torch.Tensor, slots: torch.Tensor, scales: BatchScales | None) -> torch.Tensor:
        """tokens (b,), slots (b,) on the model's device; the pool rows at `slots` advance one token in place.
        Returns the logits (b, V) float32: a view of the graph's output, valid until the next call."""
        b = tokens.shape[0]
        size = self.size_for(b)
        self.tokens[:b].copy_(tokens)
        self.tokens[b:size].zero_()
        self.slots[:b].copy_(slots)
        self.slots[b:size].fill_(self.scratch)
        fresh = self._buffered is None or self._buffered[0] is not scales or self._buffered[1] != b
        if scales is not None and fresh:  # a new batch composition (the model runner caches its BatchScales)
            self._buffered = (scales, b)
            for i, layer in enumerate(scales):
                for field, rows in (("delta", self.delta_rows[i]), ("a", self.a_rows[i])):
                    value: torch.Tensor | None = getattr(layer, field)
                    if value is not None:
                        rows[:b].copy_(value)
                        rows[b:size].fill_(1.0)
        key = (size, *scale_fields(scales))
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        captured = self.graphs[key]
        captured.graph.replay()
        return captured.logits[:b]

    def _body(self, size: int, has_delta: bool, has_a: bool) -> torch.Tensor:
        """One decode step of the static inputs' first `size` rows, in the pool. Returns (size, V)."""
        scales = None
        if has_delta or has_a:
            scales = [LayerScales(delta=self.delta_rows[i][:size] if has_delta else None,
                                  a=self.a_rows[i][:size] if has_a else None) for i in range(self.model.config.n_layer)]
        return self.model.step(self.tokens[:size], self.pool, scales, self.slots[:size])  # (size, V)

    def _capture(self, size: int, has_delta: bool, has_a: bool) -> _Graph:
        # Warm-up steps really run, so they step the scratch row only; the real rows advance once, in the
        # replay. Capturing itself runs nothing: the graph reads `slots` and the other inputs when replayed.
        real_slots = self.slots.clone()
        self.slots.fill_(self.scratch)
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(WARMUP_STEPS):
                self._body(size, has_delta, has_a)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.memory_pool), torch.no_grad():
            logits = self._body(size, has_delta, has_a)
        self.slots.copy_(real_slots)
        return _Graph(graph, logits)
