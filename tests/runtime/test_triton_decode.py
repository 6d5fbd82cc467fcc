"""The fused Triton decode kernels against the PyTorch step they replace (on CPU through Triton's
interpreter; compiled on a GPU)."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")  # interpreted on CPU (tests/conftest.py sets TRITON_INTERPRET)
pytestmark = pytest.mark.slow  # Triton's interpreter

from pools import pool_and_slots  # noqa: E402
from runtime import load_model  # noqa: E402
from runtime.ops import torch_ops, triton_gemv, triton_mamba2, triton_ssm  # noqa: E402
from runtime.ops.contract import Mamba1Weights  # noqa: E402
from runtime.scales import LayerScales  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _g(seed):
    return torch.Generator(DEVICE).manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [4, 2])
@pytest.mark.parametrize("b", [3, 6])  # 6: past GEMV_MAX_ROWS, the larger batch's launch shape
def test_conv_step_equals_pytorch_and_shifts_the_state(dtype, k, b):
    c = 300  # channels not a multiple of either launch shape's block
    x = torch.randn(b, 2 * c, device=DEVICE, dtype=dtype, generator=_g(0))[:, :c]  # a strided view, as from chunk
    state = torch.randn(b, c, k - 1, device=DEVICE, dtype=dtype, generator=_g(1))
    weight = torch.randn(c, k, device=DEVICE, dtype=dtype, generator=_g(2))
    for bias in (torch.randn(c, device=DEVICE, dtype=dtype, generator=_g(3)), None):
        want_state, got_state = state.clone(), state.clone()
        torch_ops.causal_conv1d_step(x, want_state, weight, bias)
        # The kernel sums in float32 (PyTorch sums bf16 in bf16): compare with float32 maths on the same inputs.
        want = torch_ops.causal_conv1d_step(x.float(), state.float(), weight.float(),
                                            None if bias is None else bias.float())
        got = triton_ssm.causal_conv1d_step(x, got_state, weight, bias)
        assert got.dtype == dtype
        torch.testing.assert_close(got, want.to(dtype), rtol=8e-3 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
        assert torch.equal(got_state, want_state)


@pytest.mark.parametrize("pooled", [False, True])
def test_conv_step_on_pool_rows(pooled):
    b, c, k = 3, 70, 4
    x = torch.randn(b, c, device=DEVICE, generator=_g(0))
    state = torch.randn(b, c, k - 1, device=DEVICE, generator=_g(1))
    weight, bias = torch.randn(c, k, device=DEVICE, generator=_g(2)), torch.randn(c, device=DEVICE, generator=_g(3))
    want_state = state.clone()
    want = torch_ops.causal_conv1d_step(x, want_state, weight, bias)
    pool, slots = pool_and_slots(state, pooled)
    before = pool.clone()
    got = triton_ssm.causal_conv1d_step(x, pool, weight, bias, slots)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    rows = slots if pooled else torch.arange(b, device=DEVICE)
    assert torch.equal(pool[rows], want_state)
    others = [i for i in range(pool.shape[0]) if i not in rows.tolist()]
    assert torch.equal(pool[others], before[others])  # rows no sequence owns are left alone


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("a_scaled", [False, True])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("pooled", [False, True])
def test_mamba1_step_equals_pytorch(scaled, a_scaled, gated, pooled):
    b, d, n, r = 3, 100, 16, 8
    h = torch.randn(b, d, n, device=DEVICE, generator=_g(0))
    projected = torch.randn(b, r + 2 * n, device=DEVICE, generator=_g(1))
    _, B, C = projected.split([r, n, n], dim=-1)  # strided views, as the mixer makes them
    x, z = torch.randn(b, 2 * d, device=DEVICE, generator=_g(2)).chunk(2, dim=-1)
    dt = torch.randn(b, d, device=DEVICE, generator=_g(3)) * 4  # softplus from far negative to past 20
    dt[0, :4] = torch.tensor([-30.0, 25.0, 19.9, 0.0])
    dt_bias = torch.randn(d, device=DEVICE, generator=_g(4))
    A_log = torch.randn(d, n, device=DEVICE, generator=_g(5))
    a_scale = torch.rand(b, d, n, device=DEVICE, generator=_g(6)) + 0.5 if a_scaled else None
    scale = torch.rand(b, d, device=DEVICE, generator=_g(7)) + 0.5 if scaled else None
    D = torch.randn(d, device=DEVICE, generator=_g(8))
    want_h = h.clone()
    kw = dict(dt_bias=dt_bias, A_log=A_log, delta_scale=scale, a_scale=a_scale)
    want = torch_ops.mamba1_step(want_h, x, dt, B, C, D, z if gated else None, **kw)
    pool, slots = pool_and_slots(h, pooled)
    got = triton_ssm.mamba1_step(pool, x, dt, B, C, D, z if gated else None, **kw, slots=slots)
    torch.testing.assert_close(pool[slots] if pooled else pool, want_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mamba1_step_writes_y_in_the_input_dtype():
    b, d, n = 2, 64, 4
    h = torch.zeros(b, d, n, device=DEVICE)
    x, dt, z = (torch.randn(b, d, device=DEVICE, generator=_g(i)).bfloat16() for i in range(3))
    B, C = (torch.randn(b, n, device=DEVICE, generator=_g(i)).bfloat16() for i in (3, 4))
    args = (x, dt, B, C, torch.ones(d, device=DEVICE), z)
    kw = dict(dt_bias=torch.zeros(d, device=DEVICE), A_log=torch.zeros(d, n, device=DEVICE), delta_scale=None,
              a_scale=None)
    want, got = torch_ops.mamba1_step(h.clone(), *args, **kw), triton_ssm.mamba1_step(h.clone(), *args, **kw)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


F32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize("b, dtype, scaled, pooled, conv_bias", [
    # every pair of the four switches both ways, in five of their sixteen combinations (each case is slow in the
    # interpreter)
    (3, F32, False, False, False), (3, F32, True, True, True), (3, BF16, False, True, True),
    (3, BF16, True, False, True), (3, BF16, True, True, False),
    (6, F32, True, True, True), (6, BF16, True, True, True),  # past the fused kernels' sequences: the matrix products
])
def test_mamba1_decode_equals_pytorch_and_updates_both_states(b, dtype, scaled, pooled, conv_bias):
    d, n, rank, k = 1100, 16, 12, 4  # channels over three x_proj channel blocks, a rank no power of two
    x, z = torch.randn(b, 2 * d, device=DEVICE, generator=_g(0)).to(dtype).chunk(2, dim=-1)
    conv_state = torch.randn(b, d, k - 1, device=DEVICE, generator=_g(1)).to(dtype)
    h = torch.randn(b, d, n, device=DEVICE, generator=_g(2))
    conv_weight = (torch.randn(d, k, device=DEVICE, generator=_g(3)) / 2).to(dtype)
    bias = torch.randn(d, device=DEVICE, generator=_g(4)).to(dtype) if conv_bias else None
    x_proj = (torch.randn(rank + 2 * n, d, device=DEVICE, generator=_g(5)) / d ** 0.5).to(dtype)
    dt_proj = (torch.randn(d, rank, device=DEVICE, generator=_g(6)) / rank ** 0.5).to(dtype)
    if dtype == torch.float32:  # wide ranges, softplus's branches included
        dt_bias = torch.randn(d, device=DEVICE, generator=_g(7))
        A_log = torch.randn(d, n, device=DEVICE, generator=_g(8))
    else:  # a trained model's ranges (mamba_ssm's initialisation: Δ in [0.001, 0.1], A = −1 … −n), where a
        # last-bit difference of a bfloat16 Δ, B or C moves the state by far less than it would at Δ ~ 3
        delta = 0.001 * 100 ** torch.rand(d, device=DEVICE, generator=_g(7))
        dt_bias = delta + torch.log(-torch.expm1(-delta))  # softplus⁻¹(Δ)
        A_log = torch.log(torch.arange(1, n + 1, device=DEVICE, dtype=torch.float32)).expand(d, n)
    D = torch.randn(d, device=DEVICE, generator=_g(9))
    a_scale = torch.rand(b, d, n, device=DEVICE, generator=_g(10)) + 0.5 if scaled else None
    delta_scale = torch.rand(b, d, device=DEVICE, generator=_g(11)) + 0.5 if scaled else None
    weights = Mamba1Weights(conv_weight, bias, x_proj, dt_proj, dt_bias, A_log, D)
    scales = dict(delta_scale=delta_scale, a_scale=a_scale)
    want_conv, want_h = conv_state.clone(), h.clone()
    want = torch_ops.mamba1_decode(x, z, want_conv, want_h, weights, **scales)
    conv_pool, slots = pool_and_slots(conv_state, pooled)
    h_pool, _ = pool_and_slots(h, pooled)
    got = triton_ssm.mamba1_decode(x, z, conv_pool, h_pool, weights, **scales, slots=slots)
    rows = slots if pooled else torch.arange(b, device=DEVICE)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(conv_pool[rows], want_conv)
    # float32 sums in another order, and in bfloat16 a last-bit difference in x, Δ, B or C (rounded to
    # bfloat16 as PyTorch's ops round them) carries through the state update
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(h_pool[rows], want_h, **tolerance)
    torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.parametrize("residual_dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_equals_pytorch(residual_dtype):
    b, width = 3, 200  # not a power of two
    residual = torch.randn(b, width, device=DEVICE, generator=_g(0)).to(residual_dtype)
    update = torch.randn(b, width, device=DEVICE, generator=_g(1)).bfloat16()
    weight = torch.randn(width, device=DEVICE, generator=_g(2)).bfloat16()
    want_residual, want = torch_ops.add_rms_norm(residual, update, weight, 1e-5, torch.bfloat16)
    got_residual, got = triton_gemv.add_rms_norm(residual, update, weight, 1e-5, torch.bfloat16)
    assert got_residual.dtype == residual_dtype and got.dtype == torch.bfloat16
    exact = residual_dtype == torch.float32  # a bfloat16 sum may round the other way in the last bit
    torch.testing.assert_close(got_residual, want_residual, rtol=0 if exact else 8e-3, atol=0)
    torch.testing.assert_close(got, want, rtol=8e-3, atol=1e-2)


@pytest.mark.parametrize("residual_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 6])  # 6: past the fused kernel's rows, the norm then cuBLAS
@pytest.mark.parametrize("with_update", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
# 2100: fewer than GEMV_NORM_MIN_ROWS rows in GEMV_TILE; 4100: too wide for them in GEMV_MAX_TILE, the norm then cuBLAS
@pytest.mark.parametrize("width", [200, 256, 2100, 4100])
def test_add_rms_norm_linear_equals_pytorch(residual_dtype, batch, with_update, with_bias, width):
    rows = 90  # neither it nor the width a power of two; rows not a multiple of a program's
    residual = torch.randn(batch, width, device=DEVICE, generator=_g(0)).to(residual_dtype)
    update = torch.randn(batch, width, device=DEVICE, generator=_g(1)).bfloat16() if with_update else None
    norm_weight = torch.randn(width, device=DEVICE, generator=_g(2)).bfloat16()
    weight = (torch.randn(rows, width, device=DEVICE, generator=_g(3)) / width ** 0.5).bfloat16()
    bias = torch.randn(rows, device=DEVICE, generator=_g(4)).bfloat16() if with_bias else None
    want_residual, want = torch_ops.add_rms_norm_linear(residual, update, norm_weight, 1e-5, weight, bias)
    got_residual, got = triton_gemv.add_rms_norm_linear(residual, update, norm_weight, 1e-5, weight, bias)
    assert got_residual.dtype == residual_dtype and got.dtype == torch.bfloat16 and got.shape == (batch, rows)
    exact = residual_dtype == torch.float32 or not with_update  # a bfloat16 sum may round the other way
    torch.testing.assert_close(got_residual, want_residual, rtol=0 if exact else 8e-3, atol=0)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("batch", [1, 3, 6])  # 6: past the GEMV's rows, cuBLAS
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("width", [300, 256, 8200])  # 8200: too wide for GEMV_MIN_ROWS rows a program, cuBLAS
def test_linear_equals_pytorch(batch, with_bias, width):
    rows = 70  # not a multiple of a program's
    x = torch.randn(batch, 2 * width, device=DEVICE, generator=_g(0)).bfloat16()[:, :width]  # a strided view
    weight = (torch.randn(rows, width, device=DEVICE, generator=_g(1)) / width ** 0.5).bfloat16()
    bias = torch.randn(rows, device=DEVICE, generator=_g(2)).bfloat16() if with_bias else None
    got = triton_gemv.linear(x, weight, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (batch, rows)
    torch.testing.assert_close(got, torch_ops.linear(x, weight, bias), rtol=2e-2, atol=2e-2)


def _with_fused_decode(model):
    """The model with the CUDA back-end's decode kernels (these Triton ones) and PyTorch for everything else,
    its weights row-major as on CUDA (the loader stores a CPU model's projections input-major)."""
    for param in model.parameters():
        param.data = param.data.contiguous()
    fused = SimpleNamespace(**{name: getattr(torch_ops, name) for name in dir(torch_ops) if not name.startswith("_")})
    for module, names in ((triton_ssm, ("causal_conv1d_step", "mamba1_step", "mamba1_decode")),
                          (triton_mamba2, ("mamba2_step", "mamba2_decode", "gated_rms_norm")),
                          (triton_gemv, ("add_rms_norm", "add_rms_norm_linear", "linear"))):
        for name in names:
            setattr(fused, name, getattr(module, name))
    backend = dataclasses.replace(model.backend, ops=fused)
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = backend
    return model


@pytest.mark.parametrize("arch, scale_fields", [
    ("mamba1", ()), ("mamba1", ("delta",)), ("mamba1", ("a",)), ("mamba1", ("delta", "a")),
    ("mamba2", ()), ("mamba2", ("delta", "a")),
])
def test_model_decode_on_pool_rows_with_the_fused_kernels_equals_pytorch_decode(checkpoints, arch, scale_fields):
    """What a CUDA decode graph runs, composed: the whole step with every fused kernel, states in a pool's rows."""
    # float32 on any device (CUDA would load bfloat16): the composition is under test, not bfloat16's roundings
    reference = load_model(checkpoints[arch], device=DEVICE, dtype="float32", backend="torch").model
    fused = _with_fused_decode(load_model(checkpoints[arch], device=DEVICE, dtype="float32", backend="torch").model)
    config, b = reference.config, 2
    a_shape = (config.d_inner, config.d_state) if arch == "mamba1" else (config.nheads,)
    g = _g(0)
    scales = [LayerScales(
        delta=torch.rand(b, config.scale_channels, device=DEVICE, generator=g) + 0.5 if "delta" in scale_fields
        else None,
        a=torch.rand(b, *a_shape, device=DEVICE, generator=g) + 0.5 if "a" in scale_fields else None)
        for _ in range(config.n_layer)] if scale_fields else None
    prompt = torch.randint(0, config.vocab_size, (b, 12), device=DEVICE, generator=g)
    logits, state = reference.prefill(prompt, scales=scales)
    slots = torch.tensor([2, 0], device=DEVICE)
    pool = reference.new_state(4)
    pool.write_rows(slots, state)
    tokens = logits.argmax(-1)
    for _ in range(5):
        want = reference.step(tokens, state, scales)
        got = fused.step(tokens, pool, scales, slots)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        tokens = want.argmax(-1)
    for mine, theirs in zip(pool.rows(slots).ssm + pool.rows(slots).conv, state.ssm + state.conv):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
