"""The model runner: runs the model for the engine thread, and owns what that needs between steps.

It owns the pool of recurrent states (one row per slot, plus on CUDA the graphs' scratch row), the CUDA graphs
of decode and of short prefill steps (runtime.decode_graph, runtime.prefill_graph), the bank's extensions by
bucket name (what a request's `scale_bucket` applies: "none" is identity), and the scales prepared from them: a
one-request prefill's per extension (one per bank entry, so its folded constants are made once), a batch's
(several requests' prompt chunks, or a decode step) per batch composition, kept while it repeats (so the graphs'
static buffers are refilled only when it changes, and chunks that advance together reuse theirs).

Shapes: b sequences, c chunk tokens, k kept positions, D d_model, V vocabulary.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping
from typing import NamedTuple

import torch

from runtime import IDENTITY, BatchScales, Extension, MambaLM, Padding, PoolRows, batch_scales, pads_exactly
from runtime.decode_graph import DecodeGraphs
from runtime.graph_capture import StaticScales, fields_of_batches
from runtime.prefill_graph import PrefillGraphs, prefills_in_graphs
from runtime.device_copy import to_device
from runtime.ops.launch_classes import SHORT_CHUNK, chunk_length_classes, wide_batch
from scale_bank import NONE

from .config import EngineConfig
from .slots import default_prefill_chunk, default_prefill_tokens, ssm_state_dtype

log = logging.getLogger(__name__)
WARM_UP_TOKENS = 8  # the start-up prefill: enough to run every kernel a prompt runs


class Prefilled(NamedTuple):
    """A prefill step's final-normed hidden states, float32."""

    hidden: torch.Tensor | None  # (b, c, D), a row's chunk at its first positions (decimated: (1, k, D)); None
    # where a graph ran the step (never when asked for `whole`)
    last: torch.Tensor  # (b, D): each row's at its chunk's last token


class ModelRunner:
    def __init__(self, model: MambaLM, config: EngineConfig, extensions: Mapping[str, Extension] | None = None):
        """`extensions`: the bank's, by bucket name (`Components.extensions`); none: identity only."""
        self.model = model
        self.extensions = {NONE: IDENTITY, **(extensions or {})}
        graphed = config.cuda_graphs and model.device.type == "cuda"
        # one row per slot (+ the graphs' scratch)
        ssm_dtype = ssm_state_dtype(model, config.ssm_state_dtype)
        self.slot_count = config.slots
        # the longest prompt chunk a step prefills (the engine's config is sized): the warm-up runs chunks of every
        # length class up to it
        self.longest_chunk = config.prefill_chunk or default_prefill_chunk(model.device)
        self.pool = model.new_state(config.slots + graphed, ssm_dtype)
        # the prefix cache's rows (server.prefix_cache): states of prompt prefixes, copied from and into slots
        self.prefix_pool = model.new_state(config.prefix_rows, ssm_dtype) if config.prefix_rows else None
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        if graphed:  # one graph replays at a time: the two kinds share the scale rows and the memory pool
            scales, memory = StaticScales(model.config, config.slots, model.device), torch.cuda.graph_pool_handle()
            self.graphs = DecodeGraphs(model, self.pool, scales, memory)
            if config.prefill_graphs and prefills_in_graphs(model):
                budget = config.max_prefill_tokens or default_prefill_tokens(model.device, self.longest_chunk)
                self.prefill_graphs = PrefillGraphs(model, self.pool, scales, memory, budget)
        self._prefill_scales: dict[Extension, BatchScales | None] = {}  # an extension's scales, batch of one
        self._prefill_batch = LastBatch(model)  # a prefill batch's scales, batches of several
        self._decode_batch = LastBatch(model)

    def warm_up(self) -> None:
        """What a first request would otherwise wait for, done before the server takes requests (as vLLM
        captures its graphs at start): a short prefill through the served path (kernel loading, the BLAS and
        convolution libraries' set-up; on CUDA a chunk of every length class, `_warm_up_prefill_shapes`) and, on
        CUDA, the decode graph of every batch size, and the prefill graph of every batch size and short chunk
        length, for every combination of scale fields that batches of the extensions' scales (and identity) make."""
        with torch.no_grad():
            if self.model.device.type == "cuda":
                started = time.monotonic()
                self._warm_up_prefill_shapes()
                log.info("prefill kernels compiled for every chunk-length class in %.1f s", time.monotonic() - started)
            else:  # the served path once (slot 0 is free: a request's first chunk starts from zeros)
                self.prefill([0], [[0] * WARM_UP_TOKENS], [True], [NONE])
        if self.graphs is None:
            return
        fields = fields_of_batches([e.scales for e in self.extensions.values() if e.scales is not None])
        started = time.monotonic()
        self.graphs.capture(fields)
        log.info("decode graphs captured: %d (batch sizes %s × scale fields %s) in %.1f s", len(self.graphs.graphs),
                 self.graphs.sizes, fields, time.monotonic() - started)
        if self.prefill_graphs is not None:
            started = time.monotonic()
            try:
                self.prefill_graphs.capture(fields)
            except RuntimeError as failed:  # an operation of this model's prefill that a graph cannot hold: serve
                log.warning("prefill graphs not captured (%s); short prefill steps launch their kernels one by one",
                            failed)  # on without them, as --eager-prefill would
                self.prefill_graphs = None
                return
            log.info("prefill graphs captured: %d (batch sizes %s × chunk lengths %s × scale fields %s within %d "
                     "tokens) in %.1f s", len(self.prefill_graphs.graphs), self.prefill_graphs.sizes,
                     self.prefill_graphs.lengths, fields, self.prefill_graphs.max_tokens, time.monotonic() - started)

    def _warm_up_prefill_shapes(self) -> None:
        """Triton compiles a kernel anew for each class of its integer arguments (1, divisible by 16, other) and
        of its scale fields at its first launch, and a prompt chunk's length makes the lengths and strides of the
        prefill's kernels: a first prompt of a new class would stall every stream for the compile. So each class
        of chunk length up to the longest chunk (`chunk_length_classes`) runs here through the served path: alone
        and in a batch of two, as a first chunk, a continuing one and both in one batch, with identity, with each
        scale method of the bank, and with a batch holding both methods where the bank has both (as the decode
        graphs are captured for each field combination). A chunk's kernels also compile apart for rows padded on the
        right (a short chunk's kernels take each row's length, a long chunk's Δ is silenced past each row's end, a
        tensor of its own strides), and a short chunk's for a batch large enough to take Mamba1's wide scan
        programs (`launch_classes.wide_batch`): those run too. The rows used are free slots: a request's first
        chunk starts from a zero state."""
        config = self.model.config
        wide = wide_batch(config.arch, config.d_inner, self.slot_count)
        pads_rows = pads_exactly(config)  # rows of different lengths may share a step, padded
        by_method = {e.scales.method: bucket for bucket, e in self.extensions.items()
                     if e.scales is not None and e.decimation is None}
        groups = [[NONE], *([bucket] for bucket in by_method.values())]
        if len(by_method) > 1:
            groups.append(list(by_method.values()))  # a batch carrying both methods' fields
        for group in groups:
            for length in chunk_length_classes(config.arch, self.longest_chunk):
                short = length <= SHORT_CHUNK
                sizes = set(range(len(group), min(2, self.slot_count) + 1))  # alone and in a batch of two
                if short and wide is not None and wide >= len(group):
                    sizes.add(wide)
                for b in sorted(sizes):
                    buckets = [group[i % len(group)] for i in range(b)]
                    pads = [False, True] if pads_rows and b >= 2 and length >= 2 else [False]
                    starts = [[True] * b, [False] * b] + ([[True] + [False] * (b - 1)] if b >= 2 else [])
                    for firsts, padded in itertools.product(starts, pads):
                        # padded: the last row half as long (rounded up), as the scheduler pads rows
                        chunks = [[0] * length] * (b - 1) + [[0] * ((length + 1) // 2 if padded else length)]
                        self.prefill(list(range(b)), chunks, firsts, buckets)

    def prefill(self, slots: list[int], tokens: list[list[int]], firsts: list[bool], buckets: list[str],
                whole: bool = True) -> Prefilled:
        """One prompt chunk for each of b sequences, as one batch: slots, firsts and scale buckets (b each), tokens
        b lists of at most c tokens, of one length or (where the model `pads_exactly`) of several: the shorter
        ones padded on the right, each state left at its chunk's end. A sequence starts from a zero state where
        `first`, else continues its slot's. Unless `whole` (every position's hidden state wanted: prompt
        logprobs), only each row's last is kept, and a step of short chunks runs as a captured graph."""
        extensions = [self.extensions[bucket] for bucket in buckets]
        lengths = [len(chunk) for chunk in tokens]
        assert len(extensions) == 1 or all(e.decimation is None for e in extensions), "a decimation prefills alone"
        scales = self._prefill_scales_of(tuple(extensions))
        if (not whole and self.prefill_graphs is not None and extensions[0].decimation is None
                and self.prefill_graphs.takes(len(tokens), max(lengths))):
            return Prefilled(None, self.prefill_graphs.run(tokens, slots, firsts, scales))
        device = self.model.device
        longest = max(lengths)
        # queued copies (to_device): the host goes on launching the step while the device finishes the last one
        ids = to_device([chunk + [0] * (longest - len(chunk)) for chunk in tokens], device, torch.long)  # (b, c)
        padding = Padding.of(lengths, device, self.model.config.d_conv)
        fresh = None if all(firsts) else to_device(firsts, device, torch.bool)  # (b,)
        rows = PoolRows(self.pool, to_device(slots, device, torch.long), fresh)
        hidden = self.model.prefill_rows(ids, rows, scales, decimation=extensions[0].decimation, padding=padding)
        # a row's last token: a shorter chunk's row is padded after it, a decimated one's kept positions end with it
        last = to_device([hidden.shape[1] - longest + n - 1 for n in lengths], device, torch.long)  # (b,)
        return Prefilled(hidden, hidden[torch.arange(len(lengths), device=device), last])

    def copy_state(self, slot: int, to: list[int]) -> None:
        """The state of `slot` copied into the slots `to` (the samples of one prompt)."""
        self.pool.write_rows(to, self.pool.rows([slot] * len(to)))

    def save_prefix(self, slots: list[int], rows: list[int]) -> None:
        """The states of `slots` copied into the prefix cache's `rows`."""
        assert self.prefix_pool is not None, "prefix caching is on"
        self.prefix_pool.write_rows(rows, self.pool.rows(slots))

    def load_prefix(self, rows: list[int], slots: list[int]) -> None:
        """The prefix cache's `rows` copied into `slots` (prompts that continue from them)."""
        assert self.prefix_pool is not None, "prefix caching is on"
        self.pool.write_rows(slots, self.prefix_pool.rows(rows))

    def decode(self, slots: list[int], tokens: list[int] | torch.Tensor, buckets: list[str]) -> torch.Tensor:
        """One token for each sequence: slots, tokens (a list, or a tensor on the device) and scale buckets (b
        each). The pool's rows advance in place. Returns the logits (b, V) float32, valid until the next call."""
        device = self.model.device
        slot_ids = to_device(slots, device)  # (b,)
        token_ids = tokens if isinstance(tokens, torch.Tensor) else to_device(tokens, device)  # (b,)
        scales = self._decode_batch.scales(tuple(self.extensions[bucket] for bucket in buckets))
        if self.graphs is not None:
            return self.graphs.step(token_ids, slot_ids, scales)
        return self.model.step(token_ids, self.pool, scales, slot_ids)

    def _prefill_scales_of(self, extensions: tuple[Extension, ...]) -> BatchScales | None:
        """A prefill batch's scales. One request's are made once per extension: the scan's folded per-layer
        constants are then computed once, not per chunk or per request. A batch of several's are kept while its
        composition repeats (requests whose chunks advance together)."""
        if len(extensions) > 1:
            return self._prefill_batch.scales(extensions)
        [extension] = extensions
        if extension not in self._prefill_scales:
            self._prefill_scales[extension] = prepared_scales(self.model, extensions)
        return self._prefill_scales[extension]


class LastBatch:
    """The scales of the last batch composition asked for (one extension per sequence), made again only when
    the composition changes: one batch's worth of scale tensors is held, however many compositions pass."""

    def __init__(self, model: MambaLM):
        self.model = model
        self.batch: tuple[Extension, ...] | None = None
        self.prepared: BatchScales | None = None

    def scales(self, batch: tuple[Extension, ...]) -> BatchScales | None:
        if batch != self.batch:
            self.batch = batch
            self.prepared = prepared_scales(self.model, batch)
        return self.prepared


def prepared_scales(model: MambaLM, batch: tuple[Extension, ...]) -> BatchScales | None:
    """The per-layer scales of a batch, one extension per sequence, on the model's device (None: identity)."""
    return batch_scales([e.scales for e in batch], model.config, model.device)
