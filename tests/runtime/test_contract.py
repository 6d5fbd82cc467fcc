"""The operator contract (runtime.ops.contract): every back-end module has each operator it implements with the
contract's signature, and the PyTorch back-end (with and without its C kernels) gives the reference back-end's
results for every operator, scales of both kinds included."""

import importlib
import inspect

import pytest
import torch

from runtime.ops import cpu_decode, cpu_scan, reference, torch_ops
from runtime.ops.contract import Int8DecodeOps, Mamba1Weights, Mamba2Weights, Ops
from runtime.quant import quantize_rows

OPERATORS = [name for name in dir(Ops) if not name.startswith("_")]
FULL = ["runtime.ops.reference", "runtime.ops.torch_ops", "runtime.ops.cuda_ops"]
PARTIAL = ["runtime.ops.cpu_decode", "runtime.ops.triton_ssm", "runtime.ops.triton_mamba2", "runtime.ops.triton_gemv",
           "runtime.ops.triton_channels"]


def _parameters(function):
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("module_name", FULL + PARTIAL)
def test_every_back_end_has_the_contract_signatures(module_name):
    """The contract's parameters in its order, kinds and defaults; a back-end may add keywords with defaults
    (a block length) after them."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as missing:  # mamba_ssm, triton: absent on some machines
        pytest.skip(str(missing))
    protocols = [(Ops, OPERATORS), (Int8DecodeOps, ["mamba1_decode_int8"])]
    found = [(protocol, name) for protocol, names in protocols for name in names if hasattr(module, name)]
    if module_name in FULL:
        assert {name for _, name in found} >= set(OPERATORS)
    assert found
    for protocol, name in found:
        want = _parameters(getattr(protocol, name))[1:]  # without self
        got = _parameters(getattr(module, name))
        assert got[:len(want)] == want, f"{module_name}.{name}"
        assert all(default is not inspect.Parameter.empty for _, _, default in got[len(want):]), name


@pytest.fixture(params=["kernels", "pytorch"])
def cpu_path(request, monkeypatch):
    """torch_ops on CPU: its C kernels where they build, or its PyTorch operators alone."""
    if request.param == "pytorch":
        monkeypatch.setattr(cpu_decode, "kernel", lambda: None)
        monkeypatch.setattr(cpu_scan, "kernel", lambda: None)
    elif cpu_decode.kernel() is None or cpu_scan.kernel() is None:
        pytest.skip("no C compiler for the CPU kernels")
    return request.param


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _scales(b, shape, seed, present):
    return torch.rand(b, *shape, generator=_g(seed)) + 0.5 if present else None


def _assert_same(got, want):
    for mine, theirs in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def _both(call):
    """`call(ops)` on the PyTorch and the reference back-end, each on its own copy of the in-place states."""
    return call(torch_ops), call(reference)


@pytest.mark.parametrize("delta_scaled,a_scaled", [(False, False), (True, False), (False, True), (True, True)])
def test_mamba1_operators_equal_the_reference(cpu_path, delta_scaled, a_scaled):
    b, l, d, n, r, k = 2, 9, 12, 5, 3, 4
    g = _g(0)
    x, dt, z = (torch.randn(b, l, d, generator=g) for _ in range(3))
    B, C = torch.randn(b, l, n, generator=g), torch.randn(b, l, n, generator=g)
    w = Mamba1Weights(torch.randn(d, k, generator=g), torch.randn(d, generator=g),
                      torch.randn(r + 2 * n, d, generator=g) / d ** 0.5, torch.randn(d, r, generator=g) / r ** 0.5,
                      torch.randn(d, generator=g) - 1, torch.log(torch.rand(d, n, generator=g) * 4 + 0.5),
                      torch.randn(d, generator=g))
    delta_scale, a_scale = _scales(b, (d,), 1, delta_scaled), _scales(b, (d, n), 2, a_scaled)
    A = torch_ops.ssm_A(w.A_log, a_scale)
    h0, conv = torch.randn(b, d, n, generator=g), torch.randn(b, d, k - 1, generator=g)
    out_weight = torch.randn(7, d, generator=g)
    _assert_same(*_both(lambda ops: ops.mamba1_scan(x, dt, A, B, C, w.D, z, h0, dt_bias=w.dt_bias,
                                                    delta_scale=delta_scale, out_weight=out_weight, out_bias=None)))
    scales = dict(delta_scale=delta_scale, a_scale=a_scale)
    _assert_same(*_both(lambda ops: (ops.mamba1_step(h := h0.clone(), x[:, 0], dt[:, 0], B[:, 0], C[:, 0], w.D,
                                                     z[:, 0], dt_bias=w.dt_bias, A_log=w.A_log, **scales), h)))
    _assert_same(*_both(lambda ops: (ops.mamba1_decode(x[:, 0], z[:, 0], c := conv.clone(), h := h0.clone(), w,
                                                       **scales), c, h)))
    (qx, sx), (qd, sd) = quantize_rows(w.x_proj_weight, 8), quantize_rows(w.dt_proj_weight, 8)
    int8 = Mamba1Weights(w.conv_weight, w.conv_bias, qx, qd, w.dt_bias, w.A_log, w.D, sx, sd)
    assert isinstance(torch_ops, Int8DecodeOps) and isinstance(reference, Int8DecodeOps)
    _assert_same(*_both(lambda ops: (ops.mamba1_decode_int8(x[:, 0], z[:, 0], c := conv.clone(), h := h0.clone(),
                                                            int8, **scales), c, h)))


@pytest.mark.parametrize("delta_scaled,a_scaled", [(False, False), (True, True)])
def test_mamba2_operators_equal_the_reference(delta_scaled, a_scaled):
    b, l, heads, p, groups, n = 2, 70, 4, 3, 2, 5  # past one SSD block
    g = _g(3)
    x, dt = torch.randn(b, l, heads, p, generator=g), torch.randn(b, l, heads, generator=g)
    B, C = torch.randn(b, l, groups, n, generator=g), torch.randn(b, l, groups, n, generator=g)
    D, dt_bias, A_log = (torch.randn(heads, generator=g) for _ in range(3))
    h0 = torch.randn(b, heads, p, n, generator=g)
    delta = dict(dt_bias=dt_bias, dt_limit=(0.001, 3.0), delta_scale=_scales(b, (heads,), 4, delta_scaled))
    a_scale = _scales(b, (heads,), 5, a_scaled)
    A = torch_ops.ssm_A(A_log, a_scale)
    _assert_same(*_both(lambda ops: ops.mamba2_scan(x, dt, A, B, C, D, h0, **delta)))
    _assert_same(*_both(lambda ops: (ops.mamba2_step(h := h0.clone(), x[:, 0], dt[:, 0], B[:, 0], C[:, 0], D,
                                                     A_log=A_log, a_scale=a_scale, **delta), h)))
    z, k = torch.randn(b, heads * p, generator=g), 4
    xBC = torch.randn(b, heads * p + 2 * groups * n, generator=g)
    conv = torch.randn(b, xBC.shape[1], k - 1, generator=g)
    w = Mamba2Weights(torch.randn(xBC.shape[1], k, generator=g), torch.randn(xBC.shape[1], generator=g), dt_bias,
                      A_log, D, torch.randn(heads * p, generator=g), 1e-5, groups, delta["dt_limit"])
    _assert_same(*_both(lambda ops: ops.gated_rms_norm(x.flatten(-2), torch.randn(b, l, heads * p, generator=_g(7)),
                                                       w.norm_weight, groups, 1e-5)))
    _assert_same(*_both(lambda ops: (ops.mamba2_decode(xBC, z, dt[:, 0], c := conv.clone(), h := h0.clone(), w,
                                                       delta_scale=delta["delta_scale"], a_scale=a_scale), c, h)))


def test_convolutions_and_norms_equal_the_reference(cpu_path):
    b, l, c, k = 2, 6, 10, 4
    g = _g(6)
    x, weight, bias = torch.randn(b, l, c, generator=g), torch.randn(c, k, generator=g), torch.randn(c, generator=g)
    state, scale = torch.randn(b, c, k - 1, generator=g), torch.rand(b, c, generator=g) + 0.5
    _assert_same(*_both(lambda ops: ops.causal_conv1d(x, weight, bias, state)))
    _assert_same(*_both(lambda ops: ops.causal_conv1d_scaled(x, weight, bias, None, scale)))
    _assert_same(*_both(lambda ops: (ops.causal_conv1d_step(x[:, 0], s := state.clone(), weight, bias), s)))
    _assert_same(*_both(lambda ops: ops.scale_channels(x, scale)))
    residual, update, norm_weight = x[:, 0], torch.randn(b, c, generator=g), torch.randn(c, generator=g)
    projection, projection_bias = torch.randn(7, c, generator=g), torch.randn(7, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        _assert_same(*_both(lambda ops, dtype=dtype: ops.add_rms_norm(residual, update, norm_weight, 1e-5, dtype)))
    _assert_same(*_both(lambda ops: ops.add_rms_norm_linear(residual, None, norm_weight, 1e-5, projection,
                                                            projection_bias)))
    _assert_same(*_both(lambda ops: ops.linear(residual, projection, projection_bias)))
