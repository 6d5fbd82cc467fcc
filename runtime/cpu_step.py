"""A Mamba1 model's decode step on CPU with every layer's kernel arguments prepared once, not per step.

`MambaLM.step` runs the operators of the back-end layer by layer, each checking its tensors and building its
arguments on every call: on a CPU, where a small model's step takes about a millisecond, that per-layer Python
and dispatch work is a large part of the step. `CpuStep` holds, per layer, the pointers and sizes that the
compiled kernels of ops.cpu_decode read (−exp(A_log) included), the norm's weight and the two projections, and
steps the model with one call of each kernel and each projection per layer. It is rebuilt when any weight
changes place or A_log changes (the tensors' addresses and versions are compared on every step).

It serves float32 Mamba1 models with RMSNorm whose x_proj and dt_proj are both dense or both INT8 (the kernel
reads either); `CpuStep.build` returns None for any other model, and `MambaLM.step` then runs the operators.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch

from .config import MAMBA1
from .mamba1 import Mamba1Mixer
from .ops import cpu_decode
from .quant import Projection, QuantizedWeight, linear
from .scales import BatchScales
from .state import InferenceState

if TYPE_CHECKING:
    from .model import MambaLM, Norm

Tensor = torch.Tensor


def _address(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _version(t: Tensor) -> int:
    return 0 if t.is_inference() else t._version  # inference tensors have no version


def _projections(mixer: Mamba1Mixer) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None] | None:
    """x_proj's and dt_proj's weights and row scales as the kernel reads them: both dense (no scales) or both
    INT8; None for any other mix."""
    x_proj, dt_proj = mixer.x_proj, mixer.dt_proj
    if isinstance(x_proj, QuantizedWeight) and isinstance(dt_proj, QuantizedWeight):
        if x_proj.bits != 8 or dt_proj.bits != 8:
            return None
        return x_proj.qweight, x_proj.scale, dt_proj.qweight, dt_proj.scale
    if isinstance(x_proj, QuantizedWeight) or isinstance(dt_proj, QuantizedWeight):
        return None
    return x_proj.weight, None, dt_proj.weight, None


@dataclass(frozen=True)
class _Layer:
    norm_weight: Tensor
    eps: float
    in_proj: Projection
    out_proj: Projection
    convolution: tuple[int | None, ...]  # conv_weight … dt_bias: the kernel's arguments after conv_state
    decay: tuple[int, ...]  # A: the argument after h
    D: int
    sizes: tuple[int, int, int, int]  # d, n, r, k
    A: Tensor  # −exp(A_log), kept alive while its address is in `decay`


class CpuStep:
    """The prepared step of one model (`build`), valid while `current` holds."""

    def __init__(self, layers: list[_Layer], norm: Norm, watched: list[Tensor], key: tuple[int, ...]):
        self.norm = norm  # the final norm
        self.layers = layers
        self._watched = watched  # every tensor the layers' pointers name, and the A_logs
        self._key = key

    @staticmethod
    def _key_of(watched: list[Tensor]) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in watched) + tuple(_version(t) for t in watched)

    @classmethod
    def build(cls, model: MambaLM) -> CpuStep | None:
        """The prepared step of `model` (a MambaLM), or None where it does not apply."""
        config = model.config
        if (cpu_decode.kernel() is None or config.arch != MAMBA1 or model.device.type != "cpu"
                or model.dtype != torch.float32 or model.norm_f.bias is not None):
            return None
        layers, watched = [], []
        for i in range(config.n_layer):
            block = model.block(i)
            mixer = block.mixer
            assert isinstance(mixer, Mamba1Mixer)
            projections = _projections(mixer)
            if block.norm.bias is not None or projections is None:
                return None
            conv_weight, conv_bias = mixer.conv1d.weight[:, 0], cast(Tensor | None, mixer.conv1d.bias)  # (d, k), (d,)
            x_proj, x_scale, dt_proj, dt_scale = projections
            dense = [conv_weight, mixer.dt_bias, mixer.D, block.norm.weight]
            if not cpu_decode.runs((), (*dense, conv_bias, x_scale, dt_scale),
                                   int8=tuple(t for t in (x_proj, dt_proj) if t.dtype == torch.int8)) \
                    or not cpu_decode.runs((), tuple(t for t in (x_proj, dt_proj) if t.dtype != torch.int8)):
                return None
            A = cpu_decode.mamba1_A(mixer.A_log)
            d, n = mixer.A_log.shape
            layers.append(_Layer(block.norm.weight, block.norm.eps, mixer.in_proj, mixer.out_proj,
                                 (conv_weight.data_ptr(), _address(conv_bias), x_proj.data_ptr(), _address(x_scale),
                                  dt_proj.data_ptr(), _address(dt_scale), mixer.dt_bias.data_ptr()),
                                 (A.data_ptr(),), mixer.D.data_ptr(),
                                 (d, n, mixer.config.dt_rank, conv_weight.shape[-1]), A))
            present = [t for t in (conv_bias, x_scale, dt_scale) if t is not None]
            watched += [*dense, *present, x_proj, dt_proj, mixer.A_log]
        watched.append(model.norm_f.weight)
        return cls(layers, model.norm_f, watched, cls._key_of(watched))

    @property
    def current(self) -> bool:
        """No weight has moved or changed in place (A_log) since `build`."""
        return self._key_of(self._watched) == self._key

    def step(self, residual: Tensor, state: InferenceState, scales: BatchScales | None,
             slots: Tensor | None) -> Tensor | None:
        """residual: (b, D) float32, the embedded tokens (updated in place). Returns the final-normed hidden
        states (b, D), or None (nothing changed) when the states or scales are not what the kernel reads."""
        b, m = residual.shape
        layers = [None if scales is None else scales[i] for i in range(len(self.layers))]
        if not cpu_decode.runs((*state.conv, *state.ssm),
                               tuple(t for s in layers if s is not None for t in (s.delta, s.a))):
            return None
        kernel = cpu_decode.kernel()
        assert kernel is not None, "built only with the kernels"
        slot_ids = None if slots is None else slots.to(torch.int64).contiguous()
        slot_address = _address(slot_ids)
        threads = torch.get_num_threads()
        normed = torch.empty(b, m)
        update: Tensor | None = None
        for layer, conv, h, layer_scales in zip(self.layers, state.conv, state.ssm, layers):
            kernel.add_rms_norm_f32(residual.data_ptr(), _address(update), layer.norm_weight.data_ptr(), layer.eps,
                                    residual.data_ptr(), normed.data_ptr(), b, m)
            projected = linear(normed, layer.in_proj, layer.in_proj.bias).contiguous()  # (b, 2d): x, then z
            d, n, r, k = layer.sizes
            work = torch.empty(b * (2 * d + r + 2 * n))  # y, then the kernel's scratch
            delta_scale, a_scale = (None, None) if layer_scales is None else (layer_scales.delta, layer_scales.a)
            address = projected.data_ptr()
            kernel.mamba1_decode_f32(address, 2 * d, address + 4 * d, 2 * d, conv.data_ptr(), *layer.convolution,
                                     h.data_ptr(), *layer.decay, _address(a_scale), _address(delta_scale), layer.D,
                                     slot_address, work.data_ptr() + b * d * 4, work.data_ptr(), b, d, n, r, k, threads)
            update = linear(work[:b * d].view(b, d), layer.out_proj, layer.out_proj.bias)  # (b, D)
        norm = self.norm
        kernel.add_rms_norm_f32(residual.data_ptr(), _address(update), norm.weight.data_ptr(), norm.eps,
                                residual.data_ptr(), normed.data_ptr(), b, m)
        return normed
