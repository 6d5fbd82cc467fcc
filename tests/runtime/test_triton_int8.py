"""The INT8 weight-only Triton kernel against the dequantised product it replaces (on CPU through Triton's
interpreter; compiled on a GPU, where quantised layers use it for decode steps)."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # interpreted on CPU (tests/conftest.py sets TRITON_INTERPRET)
pytestmark = pytest.mark.slow  # Triton's interpreter

from runtime.ops import triton_int8  # noqa: E402
from runtime.quant import QuantizedLinear, quantize_rows  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _g(seed):
    return torch.Generator(DEVICE).manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 17])  # the GEMV kernel up to 4 rows, the tensor-core one above
@pytest.mark.parametrize("n, k", [(70, 200), (9, 5000)])  # no multiple of a block; K over one GEMV tile
def test_int8_matmul_equals_the_dequantised_product(dtype, rows, n, k):
    q, scale = quantize_rows(torch.randn(n, k, device=DEVICE, generator=_g(0)), 8)
    x = torch.randn(rows, k, device=DEVICE, generator=_g(1)).to(dtype)
    for bias in (torch.randn(n, device=DEVICE, generator=_g(2)).to(dtype), None):
        got = triton_int8.int8_matmul(x, q, scale, bias)
        # float32 maths on the same inputs (the kernel accumulates in float32)
        want = F.linear(x.float(), q.float() * scale[:, None], None if bias is None else bias.float())
        assert got.shape == (rows, n) and got.dtype == dtype
        tolerance = 1e-4 if dtype == torch.float32 else 1e-2
        assert torch.allclose(got.float(), want, rtol=tolerance, atol=tolerance * want.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="quantised layers call the kernel on CUDA tensors only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_decode_runs_the_kernel_and_equals_dequantised(dtype):
    weight = torch.randn(96, 160, device="cuda", generator=_g(3))
    layer = QuantizedLinear(96, 160, 8, dtype, bias=True).cuda().set_from(weight)
    x = torch.randn(2, 160, device="cuda", generator=_g(4)).to(dtype)
    with torch.inference_mode():
        got = layer(x)
    want = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    assert torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
