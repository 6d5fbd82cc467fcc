"""The fused Triton decode kernels against the PyTorch step they replace (on CPU through Triton's
interpreter; compiled on a GPU)."""

import pytest
import torch

pytest.importorskip("triton")  # interpreted on CPU (tests/conftest.py sets TRITON_INTERPRET)

from runtime.ops import torch_ops, triton_decode  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _g(seed):
    return torch.Generator(DEVICE).manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [4, 2])
def test_conv_step_equals_pytorch_and_shifts_the_state(dtype, k):
    b, c = 3, 100  # channels not a multiple of the block
    x = torch.randn(b, 2 * c, device=DEVICE, dtype=dtype, generator=_g(0))[:, :c]  # a strided view, as from chunk
    state = torch.randn(b, c, k - 1, device=DEVICE, dtype=dtype, generator=_g(1))
    weight = torch.randn(c, k, device=DEVICE, dtype=dtype, generator=_g(2))
    for bias in (torch.randn(c, device=DEVICE, dtype=dtype, generator=_g(3)), None):
        want_state, got_state = state.clone(), state.clone()
        torch_ops.causal_conv1d_step(x, want_state, weight, bias)
        # The kernel sums in float32 (PyTorch sums bf16 in bf16): compare with float32 maths on the same inputs.
        want = torch_ops.causal_conv1d_step(x.float(), state.float(), weight.float(), None if bias is None else bias.float())
        got = triton_decode.causal_conv1d_step(x, got_state, weight, bias)
        assert got.dtype == dtype
        torch.testing.assert_close(got, want.to(dtype), rtol=8e-3 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
        assert torch.equal(got_state, want_state)


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("per_sequence_A", [False, True])
@pytest.mark.parametrize("gated", [True, False])
def test_mamba1_step_equals_pytorch(scaled, per_sequence_A, gated):
    b, d, n, r = 3, 100, 16, 8
    h = torch.randn(b, d, n, device=DEVICE, generator=_g(0))
    projected = torch.randn(b, r + 2 * n, device=DEVICE, generator=_g(1))
    _, B, C = projected.split([r, n, n], dim=-1)  # strided views, as the mixer makes them
    x, z = torch.randn(b, 2 * d, device=DEVICE, generator=_g(2)).chunk(2, dim=-1)
    dt = torch.randn(b, d, device=DEVICE, generator=_g(3)) * 4  # softplus from far negative to past 20
    dt[0, :4] = torch.tensor([-30.0, 25.0, 19.9, 0.0])
    dt_bias = torch.randn(d, device=DEVICE, generator=_g(4))
    A = -torch.exp(torch.randn(d, n, device=DEVICE, generator=_g(5)))
    if per_sequence_A:
        A = A * (torch.rand(b, d, n, device=DEVICE, generator=_g(6)) + 0.5)  # (b, d, n)
    scale = torch.rand(b, d, device=DEVICE, generator=_g(7)) + 0.5 if scaled else None
    D = torch.randn(d, device=DEVICE, generator=_g(8))
    want_h, got_h = h.clone(), h.clone()
    want = torch_ops.mamba1_step(want_h, x, dt, dt_bias, scale, A, B, C, D, z if gated else None)
    got = triton_decode.mamba1_step(got_h, x, dt, dt_bias, scale, A, B, C, D, z if gated else None)
    torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
