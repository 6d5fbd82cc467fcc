"""The Mamba2 Triton kernels against the PyTorch operators they replace (on CPU through Triton's interpreter;
compiled on a GPU), float32 and bfloat16, with and without per-sequence scales."""

import pytest
import torch

pytest.importorskip("triton")  # interpreted on CPU (tests/conftest.py sets TRITON_INTERPRET)
pytestmark = pytest.mark.slow  # Triton's interpreter

from pools import pool_and_slots  # noqa: E402
from runtime.ops import torch_ops, triton_mamba2  # noqa: E402
from runtime.ops.contract import Mamba2Weights  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEADS, P, GROUPS, N, K = 4, 20, 2, 16, 4  # a head dim over one program's channels and not a multiple of them


def _g(seed):
    return torch.Generator(DEVICE).manual_seed(seed)


def _randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, generator=_g(seed)).to(dtype)


def _head_parameters(dtype):
    """dt_bias, A_log (h,) float32: wide ranges in float32 (softplus's branches, the clamp); in bfloat16 a trained
    model's (Δ in [0.001, 0.1], A = −1 … −16), where a last-bit difference of a bfloat16 input moves little."""
    if dtype == torch.float32:
        return _randn(HEADS, seed=20) * 3, _randn(HEADS, seed=21)
    delta = 0.001 * 100 ** torch.rand(HEADS, device=DEVICE, generator=_g(20))
    return delta + torch.log(-torch.expm1(-delta)), torch.log(torch.linspace(1, 16, HEADS, device=DEVICE))


def _scales(b, scaled):
    """delta_scale, a_scale (b, h) float32, or None."""
    if not scaled:
        return dict(delta_scale=None, a_scale=None)
    return dict(delta_scale=torch.rand(b, HEADS, device=DEVICE, generator=_g(30)) + 0.5,
                a_scale=torch.rand(b, HEADS, device=DEVICE, generator=_g(31)) + 0.5)


def _tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaled, pooled", [(False, False), (True, True), (True, False)])
def test_mamba2_step_equals_pytorch(dtype, scaled, pooled):
    b = 3
    projected = _randn(b, HEADS * P + 2 * GROUPS * N + 7, seed=0, dtype=dtype)  # strided views, as from split
    x = projected[:, :HEADS * P].view(b, HEADS, P)
    B = projected[:, HEADS * P:HEADS * P + GROUPS * N].view(b, GROUPS, N)
    C = projected[:, HEADS * P + GROUPS * N:HEADS * P + 2 * GROUPS * N].view(b, GROUPS, N)
    dt = _randn(b, HEADS, seed=1, dtype=dtype) * 4
    if dtype == torch.float32:
        dt[0] = torch.tensor([-30.0, 25.0, 19.9, 0.0])  # softplus far below zero, past its threshold, at it
    dt_bias, A_log = _head_parameters(dtype)
    h, D = _randn(b, HEADS, P, N, seed=2), _randn(HEADS, seed=3)
    kw = dict(dt_bias=dt_bias, dt_limit=(0.01, 5.0) if dtype == torch.float32 else (0.0, float("inf")), A_log=A_log,
              **_scales(b, scaled))
    want_h = h.clone()
    want = torch_ops.mamba2_step(want_h, x, dt, B, C, D, **kw)
    pool, slots = pool_and_slots(h, pooled)
    before = pool.clone()
    got = triton_mamba2.mamba2_step(pool, x, dt, B, C, D, **kw, slots=slots)
    rows = slots if pooled else torch.arange(b, device=DEVICE)
    assert got.dtype == want.dtype == torch.float32 and got.shape == (b, HEADS, P)
    torch.testing.assert_close(pool[rows], want_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    others = [i for i in range(pool.shape[0]) if i not in rows.tolist()]
    assert torch.equal(pool[others], before[others])  # rows no sequence owns are left alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, GROUPS])
def test_gated_rms_norm_equals_pytorch_on_a_prefills_layout(dtype, groups):
    b, l, d = 2, 3, HEADS * P
    y = _randn(b, l, HEADS, P, seed=4, dtype=dtype).flatten(-2)  # the scan's output
    z = _randn(b, l, 2 * d + 5, seed=5, dtype=dtype)[..., d:2 * d]  # a slice of in_proj's output
    weight = _randn(d, seed=6, dtype=dtype)
    got = triton_mamba2.gated_rms_norm(y, z, weight, groups, 1e-5)
    assert got.dtype == dtype and got.shape == (b, l, d)
    torch.testing.assert_close(got, torch_ops.gated_rms_norm(y, z, weight, groups, 1e-5), **_tolerance(dtype))


def test_gated_rms_norm_leaves_gradients_to_pytorch():
    y = _randn(2, HEADS * P, seed=7).requires_grad_()
    z, weight = _randn(2, HEADS * P, seed=8), _randn(HEADS * P, seed=9)
    triton_mamba2.gated_rms_norm(y, z, weight, 1, 1e-5).sum().backward()  # a kernel without backward would fail
    assert y.grad is not None and y.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, scaled, pooled, conv_bias", [
    (1, False, False, True), (3, True, True, False), (6, True, False, True), (6, False, True, False),
])
def test_mamba2_decode_equals_pytorch_and_updates_both_states(dtype, b, scaled, pooled, conv_bias):
    c = HEADS * P + 2 * GROUPS * N
    projected = _randn(b, HEADS * P + c + HEADS, seed=10, dtype=dtype)  # in_proj's [z, xBC, dt], as split
    z, xBC, dt = torch.split(projected, [HEADS * P, c, HEADS], dim=-1)
    conv_state, h = _randn(b, c, K - 1, seed=11, dtype=dtype), _randn(b, HEADS, P, N, seed=12)
    dt_bias, A_log = _head_parameters(dtype)
    weights = Mamba2Weights((_randn(c, K, seed=13) / 2).to(dtype), _randn(c, seed=14, dtype=dtype) if conv_bias
                            else None, dt_bias, A_log, _randn(HEADS, seed=15), _randn(HEADS * P, seed=16, dtype=dtype),
                            1e-5, GROUPS, (0.0, float("inf")))
    scales = _scales(b, scaled)
    want_conv, want_h = conv_state.clone(), h.clone()
    want = torch_ops.mamba2_decode(xBC, z, dt, want_conv, want_h, weights, **scales)
    conv_pool, slots = pool_and_slots(conv_state, pooled)
    h_pool, _ = pool_and_slots(h, pooled)
    got = triton_mamba2.mamba2_decode(xBC, z, dt, conv_pool, h_pool, weights, **scales, slots=slots)
    rows = slots if pooled else torch.arange(b, device=DEVICE)
    assert got.dtype == want.dtype == dtype and got.shape == (b, HEADS * P)
    assert torch.equal(conv_pool[rows], want_conv)
    # the convolution step sums in float32 where PyTorch's bfloat16 one rounds: a last-bit difference in x, B or C
    # carries through the state update
    torch.testing.assert_close(h_pool[rows], want_h, **_tolerance(dtype))
    torch.testing.assert_close(got, want, **_tolerance(dtype))
