"""The prefill's per-channel Triton passes against PyTorch (on CPU through Triton's interpreter)."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # interpreted on CPU (tests/conftest.py sets TRITON_INTERPRET)
pytestmark = pytest.mark.slow  # Triton's interpreter

from runtime.ops import torch_ops, triton_channels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _g(seed):
    return torch.Generator(DEVICE).manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("carried", [0, 3])
def test_silu_of_a_padded_convolution_output_and_its_scaled_copy_equal_pytorch(dtype, scaled, carried):
    """With `carried`, the positions of a carried convolution state lead the buffer: the SiLU reads past them
    and writes dense rows (the CUDA scan's vector loads need rows that start aligned)."""
    b, d, length, pad = 2, 5, 1500, 3  # positions over one program's block
    buffer = torch.randn(b, d, carried + length + pad, device=DEVICE, generator=_g(0)).to(dtype) * 4
    padded = buffer[..., carried:]  # (b, d, length + pad) view
    scale = torch.rand(b, d, device=DEVICE, generator=_g(5)) + 0.5 if scaled else None
    got, got_scaled = triton_channels.silu(padded, length, scale)
    assert got.shape == (b, d, length) and got.is_contiguous() and got.dtype == dtype
    # exp may differ from PyTorch's in the last bit, which a bfloat16 rounding can carry to one bf16 step
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(got, F.silu(padded[..., :length]), **tolerance)
    if not scaled:
        assert got_scaled is None
        return
    assert got_scaled.shape == got.shape and got_scaled.is_contiguous()
    # the scaled copy is the returned SiLU times the scale, rounded as scale_channels rounds it (the
    # interpreter rounds float32 to bfloat16 toward zero: two steps off at most, a GPU to nearest)
    exact = dtype == torch.float32 or DEVICE == "cuda"
    want = torch_ops.scale_channels(got.transpose(1, 2), scale).transpose(1, 2)
    torch.testing.assert_close(got_scaled, want, rtol=0 if exact else 1.6e-2, atol=0)


@pytest.mark.parametrize("scaled", [False, True])
def test_silu_of_a_one_position_convolution_answered_channels_last(scaled):
    """Mamba2's xBC is a slice of in_proj's (b, l, ·) output: a first chunk of one token, alone, reaches the
    convolution channels-last, and the convolution answers in that layout, whose rows are not dense."""
    c, k = 24, 4
    projected = torch.randn(1, 1, 64, device=DEVICE, generator=_g(6))  # (b, l, in_proj rows)
    convolved = F.conv1d(projected[..., 8:8 + c].transpose(1, 2), torch.randn(c, 1, k, device=DEVICE, generator=_g(7)),
                         padding=k - 1, groups=c)  # (1, c, k)
    scale = torch.rand(1, c, device=DEVICE, generator=_g(8)) + 0.5 if scaled else None
    got, got_scaled = triton_channels.silu(convolved, 1, scale)
    torch.testing.assert_close(got, F.silu(convolved[..., :1]), rtol=1e-6, atol=1e-6)
    if scaled:
        torch.testing.assert_close(got_scaled, got * scale[..., None], rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_channels_equals_pytorch_and_keeps_the_channels_first_layout(dtype):
    b, length, d = 2, 1300, 6
    x = torch.randn(b, d, length, device=DEVICE, generator=_g(1)).to(dtype).transpose(1, 2)  # (b, l, d) view
    scale = torch.rand(b, d, device=DEVICE, generator=_g(2)) + 0.5
    got = triton_channels.scale_channels(x, scale)
    assert got.shape == x.shape and got.stride() == x.stride()
    # the same two roundings; Triton's interpreter rounds float32 to bfloat16 toward zero (two steps off at
    # most), a GPU to nearest
    exact = dtype == torch.float32 or DEVICE == "cuda"
    torch.testing.assert_close(got, torch_ops.scale_channels(x, scale), rtol=0 if exact else 1.6e-2, atol=0)


def test_scale_channels_falls_back_to_pytorch_for_other_layouts_and_for_gradients():
    x = torch.randn(2, 7, 3, device=DEVICE, generator=_g(3))  # (b, l, d) contiguous: not a channels-first view
    scale = (torch.rand(2, 3, device=DEVICE, generator=_g(4)) + 0.5).requires_grad_()
    assert torch.equal(triton_channels.scale_channels(x, scale.detach()), torch_ops.scale_channels(x, scale.detach()))
    channels_first = x.transpose(1, 2).contiguous().transpose(1, 2)
    triton_channels.scale_channels(channels_first, scale).sum().backward()  # a kernel without backward would fail
    torch.testing.assert_close(scale.grad, x.sum(1))
    padded = x.transpose(1, 2).contiguous()  # (b, d, l)
    _, scaled = triton_channels.silu(padded, 7, scale)
    scaled.sum().backward()
    torch.testing.assert_close(scale.grad, x.sum(1) + F.silu(padded).sum(-1))
