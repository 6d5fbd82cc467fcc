"""The CUDA back-end's short-chunk kernels (`triton_short_conv`, `triton_short_scan`) put in place of the PyTorch
back-end's convolution and scans, called as `cuda_ops` calls them for a chunk of at most SHORT_CHUNK tokens: a model
on the PyTorch back-end then runs them (through Triton's interpreter on CPU) wherever its prefill would."""

import pytest
import torch.nn.functional as F

from runtime.ops import torch_ops, triton_short_conv, triton_short_scan


def _ends(padding):
    return None if padding is None else padding.ends


def conv_scaled(x, weight, bias, state, scale, padding=None):
    return triton_short_conv.short_causal_conv1d(x, weight, bias, state, scale, _ends(padding))


def conv(x, weight, bias, state, padding=None):
    y, _, new_state = conv_scaled(x, weight, bias, state, None, padding)
    return y, new_state


def mamba1_scan(x, dt, A, B, C, D, z, h0, *, dt_bias, delta_scale, out_weight, out_bias, padding=None):
    y, h = triton_short_scan.mamba1_short_scan(x, dt, dt_bias, A, B, C, D, z, h0, delta_scale, _ends(padding))
    return F.linear(y, out_weight, out_bias), h


def mamba2_scan(x, dt, A, B, C, D, h0, *, dt_bias, dt_limit, delta_scale, padding=None):
    delta = torch_ops.discretise(dt, dt_bias, delta_scale, dt_limit)
    return triton_short_scan.mamba2_short_scan(x, delta, A, B, C, D, h0, _ends(padding))


def use_short_convolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_ops, "causal_conv1d", conv)
    monkeypatch.setattr(torch_ops, "causal_conv1d_scaled", conv_scaled)


def use_short_scans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_ops, "mamba1_scan", mamba1_scan)
    monkeypatch.setattr(torch_ops, "mamba2_scan", mamba2_scan)
