"""The Mamba language model: embedding, residual blocks of Mamba1 or Mamba2 mixers, final norm, LM head.

Shape glossary: b batch, l sequence, D d_model, V vocabulary (padded).

The model holds no per-request state. Callers say what they do:
- `prefill(tokens, state, scales)`: a prompt (optionally continuing from `state`), returning the last
  token's logits and a new state; `chunk_len` bounds memory on long prompts;
- `step(tokens, state, scales)`: one token per sequence, the state updated in place;
- `hidden_states(...)` + `logits(...)` / `token_logprobs(...)`: every position's output, its logits taken in
  slices so a 64k prompt's full (l, V) logits never exist at once; `hidden_states_only(...)` the outputs without
  the new state; `prefill_rows(...)` the same for a batch whose states are rows of a pool, written layer by layer
  (what a server's prefill runs).
`scales` is a `BatchScales` (one `LayerScales` per layer, each sequence its own row) or None for identity.
`decimation` (runtime.decimation) drops prompt positions after one layer in `hidden_states` and `prefill`;
None, or a prompt short enough that it drops nothing, is exactly the base model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import cast

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .backend import Backend
from .config import MAMBA1, ModelConfig
from .cpu_step import CpuStep
from .decimation import Decimation
from .errors import DecimationError
from .mamba1 import Mamba1Mixer
from .mamba2 import Mamba2Mixer
from .padding import Padding, pads_exactly
from .quant import QuantizedEmbedding, QuantizedLinear, QuantizedWeight, linear
from .scales import BatchScales
from .state import InferenceState, MixerOutput, PoolRows

LOGITS_SLICE = 2048  # positions per slice of logits: (2048, V) float32 is 400 MB at V = 50k


class Norm(nn.Module):
    """RMSNorm (or LayerNorm with bias when `rms_norm` is false), computed in float32."""

    def __init__(self, d: int, eps: float, rms: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = None if rms else nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.bias is None:  # F.rms_norm is one fused kernel on CUDA: no (l, D) float32 temporaries
            return F.rms_norm(x, x.shape[-1:], self.weight.float(), self.eps)
        return F.layer_norm(x, x.shape[-1:], self.weight.float(), self.bias.float(), self.eps)


class Block(nn.Module):
    """x -> x + mixer(norm(x)); the residual stream stays float32 when `residual_in_fp32`."""

    def __init__(self, config: ModelConfig, backend: Backend):
        super().__init__()
        self.norm = Norm(config.d_model, config.norm_eps, config.rms_norm)
        mixer = Mamba1Mixer if config.arch == MAMBA1 else Mamba2Mixer
        self.mixer: Mamba1Mixer | Mamba2Mixer = mixer(config, backend)


class MambaLM(nn.Module):
    def __init__(self, config: ModelConfig, backend: Backend):
        super().__init__()
        self.config = config
        self.backend = backend
        self.embedding: nn.Embedding | QuantizedEmbedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, backend) for _ in range(config.n_layer))
        self.norm_f = Norm(config.d_model, config.norm_eps, config.rms_norm)
        self.lm_head: nn.Linear | QuantizedLinear | None = (
            None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False))
        self._cpu_step: CpuStep | None = None  # the prepared CPU decode step, built at the first step

    @property
    def dtype(self) -> torch.dtype:  # read off norm_f: a quantised embedding's .weight dequantises the table
        return self.norm_f.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm_f.weight.device

    def _residual_dtype(self) -> torch.dtype:
        return torch.float32 if self.config.residual_in_fp32 else self.dtype

    def new_state(self, batch: int, ssm_dtype: torch.dtype = torch.float32) -> InferenceState:
        """Zero states of `batch` sequences, the SSM states stored in `ssm_dtype` (runtime.state)."""
        return InferenceState.zeros(self.config, batch, self.device, self.dtype, ssm_dtype)

    def block(self, i: int) -> Block:
        return cast(Block, self.layers[i])

    def _layer(self, i: int, residual: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None,
               scales: BatchScales | None, decimation: Decimation | None = None,
               padding: Padding | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """residual (b, l, D) -> (b, l, D), or (b, k, D) at the kept positions when this layer decimates; and the
        layer's new conv and ssm states, from its (conv, ssm) `state` or none (with `padding`, each row's after its
        last real token)."""
        block = self.block(i)
        mixed: MixerOutput = block.mixer(
            block.norm(residual).to(self.dtype),
            None if state is None else state[0],
            None if state is None else state[1],
            None if scales is None else scales[i],
            return_delta=decimation is not None,
            padding=padding,
        )
        conv, ssm = mixed.state
        residual = residual + mixed.out  # (b, l, D)
        if decimation is not None and mixed.delta is not None:
            # the layer's own state is the full sequence's; the later layers see the k kept positions
            kept = decimation.kept_positions(mixed.delta)  # (b, k)
            residual = residual.gather(1, kept[..., None].expand(-1, -1, residual.shape[-1]))  # (b, k, D)
        return residual, conv.to(self.dtype), ssm

    def hidden_states(self, tokens: torch.Tensor, state: InferenceState | None = None,
                      scales: BatchScales | None = None, checkpoint: bool = False,
                      decimation: Decimation | None = None) -> tuple[torch.Tensor, InferenceState]:
        """tokens: (b, l). Returns the final-normed hidden states (b, l, D) float32 and the new state.

        `checkpoint` recomputes each layer in the backward pass instead of keeping its activations: what
        calibrating scales by back-propagation at 16k-64k tokens needs to fit in memory.

        With `decimation`, the hidden states are those of the kept positions only, (b, k, D) in order,
        ending with the last `keep_last` positions: logits of every prompt position (`token_logprobs`,
        echo) do not exist for a decimated prompt, only those of its last `keep_last` positions."""
        conv_states: list[torch.Tensor] = []
        ssm_states: list[torch.Tensor] = []

        def keep(i: int, conv: torch.Tensor, ssm: torch.Tensor) -> None:
            conv_states.append(conv)
            ssm_states.append(ssm)

        hidden = self._layers(tokens, None if state is None else lambda i: (state.conv[i], state.ssm[i]), keep,
                              scales, checkpoint, decimation)
        return hidden, InferenceState(conv_states, ssm_states)

    def hidden_states_only(self, tokens: torch.Tensor, scales: BatchScales | None = None, checkpoint: bool = False,
                           decimation: Decimation | None = None) -> torch.Tensor:
        """`hidden_states` from zero states, without the new state: each layer's is dropped as soon as it is made
        rather than held to the end (what scoring and training read: the outputs)."""
        return self._layers(tokens, None, lambda i, conv, ssm: None, scales, checkpoint, decimation)

    def prefill_rows(self, tokens: torch.Tensor, rows: PoolRows, scales: BatchScales | None = None,
                     decimation: Decimation | None = None, padding: Padding | None = None) -> torch.Tensor:
        """`hidden_states` of a batch whose states are rows of a pool, which advance in place layer by layer
        (`PoolRows`); with `padding` (where `pads_exactly`), rows padded on the right, each row's state ends at its
        last real token. Returns the final-normed hidden states (b, l, D) float32 (with `decimation`, (b, k, D))."""
        assert padding is None or (decimation is None and pads_exactly(self.config)), "padding is exact here"
        return self._layers(tokens, rows.read, rows.write, scales, False, decimation, padding)

    def _layers(self, tokens: torch.Tensor, read: Callable[[int], tuple[torch.Tensor, torch.Tensor] | None] | None,
                write: Callable[[int, torch.Tensor, torch.Tensor], None], scales: BatchScales | None,
                checkpoint: bool, decimation: Decimation | None, padding: Padding | None = None) -> torch.Tensor:
        """tokens (b, l) through every layer: layer i starts from `read(i)` (None: no state) and hands its new
        conv and ssm states to `write` as soon as it is done. Returns the final-normed hidden states."""
        if decimation is not None:
            decimation.check(len(self.layers))
            if not decimation.drops(tokens.shape[1]):
                decimation = None  # nothing to drop: run exactly the base model
        residual = self.embedding(tokens).to(self._residual_dtype())  # (b, l, D)
        for i in range(len(self.layers)):
            decimating = decimation if decimation is not None and i == decimation.layer else None
            state = None if read is None else read(i)
            if checkpoint:
                residual, conv, ssm = torch.utils.checkpoint.checkpoint(
                    self._layer, i, residual, state, scales, decimating, padding, use_reentrant=False)
            else:
                residual, conv, ssm = self._layer(i, residual, state, scales, decimating, padding)
            write(i, conv, ssm)
        hidden: torch.Tensor = self.norm_f(residual)  # (b, l, D)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (..., D) -> (..., V) float32."""
        head = self.embedding if self.lm_head is None else self.lm_head  # tied: the embedding table
        return linear(hidden.to(self.dtype), head).float()

    def iter_logits(self, hidden: torch.Tensor, slice_len: int = LOGITS_SLICE) -> Iterator[tuple[int, torch.Tensor]]:
        """hidden: (b, l, D). Yields (start, logits (b, slice, V)) so that full logits never exist at once."""
        for start in range(0, hidden.shape[1], slice_len):
            yield start, self.logits(hidden[:, start:start + slice_len])

    def _slice_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(self.logits(hidden), dim=-1)  # (b, s, V)
        return logp.gather(-1, targets[..., None]).squeeze(-1)  # (b, s)

    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, slice_len: int = LOGITS_SLICE,
                       checkpoint: bool = False) -> torch.Tensor:
        """log p(targets[:, t] | prefix up to t) from hidden (b, l, D) and targets (b, l). Returns (b, l).

        Logits exist one slice at a time; with `checkpoint` a slice's logits are also not kept for the
        backward pass but recomputed (a (l, V) float32 tensor is 6 GB at 32k tokens and V = 50k)."""
        if hidden.shape[:2] != targets.shape:
            raise ValueError(f"hidden states of {tuple(hidden.shape[:2])} (batch, positions) for targets of "
                             f"{tuple(targets.shape)}: one target per position (a decimated prefill keeps only "
                             f"some positions; score its last keep_last ones)")
        parts = []
        for start in range(0, hidden.shape[1], slice_len):
            args = (hidden[:, start:start + slice_len], targets[:, start:start + slice_len])
            if checkpoint:
                parts.append(torch.utils.checkpoint.checkpoint(self._slice_logprobs, *args, use_reentrant=False))
            else:
                parts.append(self._slice_logprobs(*args))
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, state: InferenceState | None = None, scales: BatchScales | None = None,
                chunk_len: int | None = None,
                decimation: Decimation | None = None) -> tuple[torch.Tensor, InferenceState]:
        """tokens: (b, l). Returns the last position's logits (b, V) float32 and the new state.

        With `chunk_len`, the prompt runs in chunks of that many tokens, each continuing from the last
        one's state: same result, activations bounded by the chunk instead of the prompt. A `decimation`
        ranks the whole prompt's positions, so it takes the prompt in one piece (no `chunk_len` below l)."""
        chunk_len = chunk_len or tokens.shape[1]
        if decimation is not None and chunk_len < tokens.shape[1]:
            raise DecimationError(f"decimation needs the whole prompt in one piece: chunk_len {chunk_len} is "
                                  f"shorter than the prompt's {tokens.shape[1]} tokens")
        for start in range(0, tokens.shape[1], chunk_len):
            hidden, state = self.hidden_states(tokens[:, start:start + chunk_len], state, scales,
                                               decimation=decimation)
        assert state is not None  # a prompt has at least one token
        return self.logits(hidden[:, -1]), state

    def _add_norm(self, residual: torch.Tensor, update: torch.Tensor | None,
                  norm: Norm) -> tuple[torch.Tensor, torch.Tensor]:
        """residual + update (None: none yet) and its `norm` in the model's dtype; an RMSNorm is the back-end's
        add_rms_norm, one kernel on a GPU. Returns (residual, normed), both (b, D)."""
        if norm.bias is None:
            return self.backend.ops.add_rms_norm(residual, update, norm.weight, norm.eps, self.dtype)
        if update is not None:
            residual = residual + update
        return residual, norm(residual).to(self.dtype)

    def _add_norm_in_proj(self, residual: torch.Tensor, update: torch.Tensor | None,
                          block: Block) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream after `update` (None: none yet) and the block's in_proj of its norm: (b, D) and
        (b, in_proj rows). RMSNorm into a dense in_proj is the back-end's add_rms_norm_linear, on a GPU one
        kernel for a batch of a few, which a decode step's input projections are."""
        in_proj = block.mixer.in_proj
        if block.norm.bias is None and not isinstance(in_proj, QuantizedWeight):
            return self.backend.ops.add_rms_norm_linear(residual, update, block.norm.weight, block.norm.eps,
                                                        in_proj.weight, in_proj.bias)
        residual, hidden = self._add_norm(residual, update, block.norm)
        projected: torch.Tensor = in_proj(hidden)
        return residual, projected

    def _prepared_cpu_step(self) -> CpuStep | None:
        """runtime.cpu_step's prepared decode step where it applies (a float32 Mamba1 model on CPU), rebuilt when a
        weight has changed."""
        if self.device.type != "cpu":
            return None
        if self._cpu_step is None or not self._cpu_step.current:
            self._cpu_step = CpuStep.build(self)
        return self._cpu_step

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: InferenceState, scales: BatchScales | None = None,
             slots: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (b,), one per sequence. `state` (batch b) is updated in place; with `slots` (b,) int64 it is
        a pool instead, whose row slots[i] is sequence i's (no gather before the step, no scatter after).
        Returns logits (b, V)."""
        residual = self.embedding(tokens).to(self._residual_dtype())  # (b, D)
        prepared = self._prepared_cpu_step()
        hidden = None if prepared is None else prepared.step(residual, state, scales, slots)  # (b, D)
        if hidden is not None:
            return self.logits(hidden)
        update = None  # (b, D): the last block's output, not yet added to the residual stream
        for i in range(len(self.layers)):
            block = self.block(i)
            residual, projected = self._add_norm_in_proj(residual, update, block)  # (b, D), (b, in_proj rows)
            update = block.mixer.step(projected, state.conv[i], state.ssm[i], None if scales is None else scales[i],
                                      slots)
        _, hidden = self._add_norm(residual, update, self.norm_f)
        return self.logits(hidden)
