"""The model runner: runs the model for the engine thread, and owns what that needs between steps.

It owns the pool of recurrent states (one row per slot, plus on CUDA the decode graphs' scratch row), the
CUDA decode graphs (runtime.decode_graph), and the scales prepared from each request's `Extension`: a
prefill's per extension (a bank hands out one per entry, so its folded constants are made once), a decode
batch's per batch composition (so the graphs' static buffers are refilled only when it changes).

Shapes: b sequences, c chunk tokens, k kept positions, D d_model, V vocabulary.
"""

from __future__ import annotations

import logging
import time

import torch

from runtime import BatchScales, Extension, MambaLM, ScaleSet, batch_scales
from runtime.decode_graph import DecodeGraphs, fields_of_batches

from .config import EngineConfig

log = logging.getLogger(__name__)
WARM_UP_TOKENS = 8  # the start-up prefill: enough to run every kernel a prompt runs


class ModelRunner:
    def __init__(self, model: MambaLM, config: EngineConfig):
        self.model = model
        graphed = config.cuda_graphs and model.device.type == "cuda"
        self.pool = model.new_state(config.slots + graphed)  # one row per slot (+ the graphs' scratch)
        self.graphs = DecodeGraphs(model, self.pool) if graphed else None
        self._prefill_scales: dict[Extension, BatchScales | None] = {}  # an extension's scales, batch of one
        self._decode_batch: tuple[Extension, ...] | None = None  # the batch the decode scales belong to
        self._decode_scales: BatchScales | None = None

    def warm_up(self, scale_sets: list[ScaleSet]) -> None:
        """What a first request would otherwise wait for, done before the server takes requests (as vLLM
        captures its graphs at start): a short prefill (kernel loading, the BLAS and convolution libraries'
        set-up) and, on CUDA, the decode graph of every batch size for every combination of scale fields
        that batches of `scale_sets` (and identity) make."""
        with torch.no_grad():
            self.model.prefill(torch.zeros(1, WARM_UP_TOKENS, dtype=torch.long, device=self.model.device))
        if self.graphs is None:
            return
        fields = fields_of_batches(scale_sets)
        started = time.monotonic()
        self.graphs.capture(fields)
        log.info("decode graphs captured: %d (batch sizes %s × scale fields %s) in %.1f s", len(self.graphs.graphs),
                 self.graphs.sizes, fields, time.monotonic() - started)

    def prefill(self, slot: int, tokens: list[int], first: bool, extension: Extension) -> torch.Tensor:
        """One prompt chunk of the sequence in `slot`, continuing its state unless `first`. Returns the hidden
        states (1, c, D); decimated, (1, k, D) at the kept positions, ending with the prompt's last."""
        state = None if first else self.pool.rows([slot])  # None: zeros, a fresh sequence
        ids = torch.tensor([tokens], device=self.model.device)  # (1, c)
        hidden, state = self.model.hidden_states(ids, state, self._scales_of(extension),
                                                 decimation=extension.decimation)
        self.pool.write_rows([slot], state)
        return hidden

    def copy_state(self, slot: int, to: list[int]) -> None:
        """The state of `slot` copied into the slots `to` (the samples of one prompt)."""
        self.pool.write_rows(to, self.pool.rows([slot] * len(to)))

    def decode(self, slots: list[int], tokens: list[int], extensions: list[Extension]) -> torch.Tensor:
        """One token for each sequence: slots, tokens and extensions (b each). The pool's rows advance in
        place. Returns the logits (b, V) float32, valid until the next call."""
        device = self.model.device
        slot_ids, token_ids = torch.tensor(slots, device=device), torch.tensor(tokens, device=device)  # (b,), (b,)
        batch = tuple(extensions)
        if batch != self._decode_batch:
            self._decode_batch = batch
            self._decode_scales = batch_scales([e.scales for e in batch], self.model.config, device)
        if self.graphs is not None:
            return self.graphs.step(token_ids, slot_ids, self._decode_scales)
        return self.model.step(token_ids, self.pool, self._decode_scales, slot_ids)

    def _scales_of(self, extension: Extension) -> BatchScales | None:
        """A prefill's scales, made once per extension: the scan's folded per-layer constants are then
        computed once, not per chunk or per request."""
        if extension not in self._prefill_scales:
            scales = extension.scales
            prepared = None if scales is None else batch_scales([scales], self.model.config, self.model.device)
            self._prefill_scales[extension] = prepared
        return self._prefill_scales[extension]
