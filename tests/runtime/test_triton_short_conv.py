"""The short-chunk convolution kernel against the PyTorch convolution (on CPU through Triton's interpreter; compiled
on a GPU): y, its scaled copy and the new state, from zeros or a carried state, from a slice of a projection's
output in either layout, and the states of rows padded on the right."""

import pytest
import torch

pytest.importorskip("triton")  # interpreted on CPU (tests/conftest.py sets TRITON_INTERPRET)
pytestmark = pytest.mark.slow  # Triton's interpreter

from checkpoints import VOCAB  # noqa: E402
from scale_sets import delta_and_a_scales  # noqa: E402
from short_kernels import use_short_convolution  # noqa: E402

from runtime import Padding, batch_scales, load_model  # noqa: E402
from runtime.ops import torch_ops, triton_short_conv  # noqa: E402
from runtime.ops.launch_classes import SHORT_CHUNK  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("carried", [False, True])
@pytest.mark.parametrize("length", [1, 2, 37, SHORT_CHUNK])  # 1 and 2: the new state is partly the carried one
def test_the_short_convolution_equals_pytorchs(dtype, carried, length):
    b, c, k = 3, 20, 4  # channels not a multiple of the kernel's block
    g = torch.Generator(DEVICE).manual_seed(length + carried)
    projected = torch.randn(b, 2 * c, length, device=DEVICE, generator=g).to(dtype)  # a (b, 2c, l) projection
    x = projected.transpose(1, 2)[..., :c]  # (b, l, c) view: x's half
    weight = torch.randn(c, k, device=DEVICE, generator=g).to(dtype)
    bias = torch.randn(c, device=DEVICE, generator=g).to(dtype)
    state = torch.randn(b, c, k - 1, device=DEVICE, generator=g).to(dtype) if carried else None
    scale = torch.rand(b, c, device=DEVICE, generator=g) + 0.5
    y, scaled, new_state = triton_short_conv.short_causal_conv1d(x, weight, bias, state, scale)
    want_y, want_state = torch_ops.causal_conv1d(x.float(), weight.float(), bias.float(),
                                                 None if state is None else state.float())
    assert y.shape == (b, length, c) and y.is_contiguous() and y.dtype == dtype  # token-major
    # float32 multiply-adds rounded once; PyTorch's bfloat16 convolution rounds before its SiLU too
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(y.float(), want_y, **tolerance)
    assert torch.equal(new_state, want_state.to(dtype))  # the inputs themselves, copied
    # the scaled copy is y times the scale rounded to the dtype (the interpreter rounds float32 to bfloat16 toward
    # zero: two steps off at most, a GPU to nearest)
    exact = dtype == torch.float32 or DEVICE == "cuda"
    torch.testing.assert_close(scaled, torch_ops.scale_channels(y, scale), rtol=0 if exact else 1.6e-2, atol=0)


def test_without_bias_or_scale():
    b, c, k, length = 2, 8, 4, 5
    g = torch.Generator(DEVICE).manual_seed(9)
    x = torch.randn(b, c, length, device=DEVICE, generator=g).transpose(1, 2)
    weight = torch.randn(c, k, device=DEVICE, generator=g)
    y, scaled, new_state = triton_short_conv.short_causal_conv1d(x, weight, None, None, None)
    want_y, want_state = torch_ops.causal_conv1d(x, weight, None, None)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    assert scaled is None and torch.equal(new_state, want_state)


@pytest.mark.parametrize("carried", [False, True])
def test_padded_rows_keep_the_state_before_their_own_ends(carried):
    """Rows padded on the right (lengths 5, 1 and 2 of 6, a token-major x): each row's new state is the k−1 inputs
    before its end, partly the carried state's where the row is shorter than k−1; y as without the lengths."""
    b, c, k, length = 3, 20, 4, 6
    g = torch.Generator(DEVICE).manual_seed(11 + carried)
    x = torch.randn(b, length, 2 * c, device=DEVICE, generator=g)[..., :c]  # token-major, as in_proj's short output
    weight = torch.randn(c, k, device=DEVICE, generator=g)
    state = torch.randn(b, c, k - 1, device=DEVICE, generator=g) if carried else None
    lengths = [5, 1, 2]
    padding = Padding.of(lengths, torch.device(DEVICE), k)
    y, _, new_state = triton_short_conv.short_causal_conv1d(x, weight, None, state, None, padding.ends)
    want_y, want_state = torch_ops.causal_conv1d(x, weight, None, state, padding)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    assert torch.equal(new_state, want_state)
    for row, end in enumerate(lengths):  # each row alone, cut at its end
        start = None if state is None else state[row:row + 1]
        _, alone = torch_ops.causal_conv1d(x[row:row + 1, :end], weight, None, start)
        assert torch.equal(new_state[row:row + 1], alone)


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_a_models_chunked_prefill_on_the_short_convolution_equals_pytorchs(checkpoints, monkeypatch, arch):
    """The mixers hand it what the CUDA back-end's short path takes: chunks continuing the last one's convolution
    state, one sequence's Δ set folded into the scaled copy (Mamba1), a batch of sets, and Mamba2's xBC."""
    model = load_model(checkpoints[arch], device=DEVICE, dtype="float32", backend="torch").model
    delta, a = delta_and_a_scales(model.config)
    tokens = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    cases = [(tokens, batch_scales([delta, None, a], model.config, DEVICE)),
             (tokens[:1], batch_scales([delta], model.config, DEVICE))]
    wanted = [model.prefill(ids, scales=scales, chunk_len=8) for ids, scales in cases]

    use_short_convolution(monkeypatch)
    for (ids, scales), (want, want_state) in zip(cases, wanted):
        got, got_state = model.prefill(ids, scales=scales, chunk_len=8)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for mine, theirs in zip(got_state.conv + got_state.ssm, want_state.conv + want_state.ssm):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
