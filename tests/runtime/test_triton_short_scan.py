"""The short-chunk scans against the float64 reference scans (on CPU through Triton's interpreter; compiled on a GPU),
with every input they take: initial states, an A per sequence, Δ scales, Mamba1's z gate, Mamba2's groups,
channels-first views."""

import math

import pytest
import torch

pytest.importorskip("triton")  # interpreted on CPU (tests/conftest.py sets TRITON_INTERPRET)
pytestmark = pytest.mark.slow  # Triton's interpreter

from checkpoints import VOCAB  # noqa: E402
from scale_sets import delta_and_a_scales  # noqa: E402
from short_kernels import use_short_scans  # noqa: E402

from runtime import Padding, batch_scales, load_model  # noqa: E402
from runtime.ops import reference, torch_ops, triton_short_scan  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(b: int, l: int, d: int, n: int, dtype: torch.dtype, seed: int) -> dict:
    g = torch.Generator(DEVICE).manual_seed(seed)

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*size, device=DEVICE, generator=g) * scale

    def channels_first(t: torch.Tensor) -> torch.Tensor:  # (b, l, ·) view of (b, ·, l) storage, in the model's dtype
        return t.to(dtype).transpose(1, 2).contiguous().transpose(1, 2)

    return dict(x=channels_first(randn(b, l, d)), dt=channels_first(randn(b, l, d, scale=0.5) - 1.0),
                A=-torch.exp(randn(d, n, scale=0.5)), A_per_sequence=-torch.exp(randn(b, d, n, scale=0.5)),
                B=channels_first(randn(b, l, n)), C=channels_first(randn(b, l, n)), D=randn(d),
                z=channels_first(randn(b, l, d)), h0=randn(b, d, n), dt_bias=randn(d, scale=0.1),
                delta_scale=torch.rand(b, d, device=DEVICE, generator=g) + 0.5)


def _check(t: dict, *, A: torch.Tensor, z: torch.Tensor | None, h0: torch.Tensor | None,
           delta_scale: torch.Tensor | None, dtype: torch.dtype) -> None:
    b, l, d = t["x"].shape
    y, h = triton_short_scan.mamba1_short_scan(t["x"], t["dt"], t["dt_bias"], A, t["B"], t["C"], t["D"], z, h0,
                                               delta_scale)
    identity = torch.eye(d, device=DEVICE, dtype=torch.float64)  # out_proj: y itself, unrounded
    want_y, want_h = reference.mamba1_scan(t["x"], t["dt"], A, t["B"], t["C"], t["D"], z, h0, dt_bias=t["dt_bias"],
                                           delta_scale=delta_scale, out_weight=identity, out_bias=None)
    assert y.shape == (b, l, d) and y.is_contiguous() and y.dtype == dtype
    assert h.shape == (b, d, A.shape[-1]) and h.is_contiguous() and h.dtype == torch.float32
    # float32 maths against float64: y rounded once to the model's dtype
    y_tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(y.double(), want_y, **y_tolerance)
    torch.testing.assert_close(h, want_h, rtol=3e-5, atol=3e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("from_state", [False, True])
def test_the_short_scan_equals_the_reference_scan(dtype, scaled, from_state):
    b, l, d, n = 3, 21, 40, 16  # channels not a multiple of the kernel's block
    t = _inputs(b, l, d, n, dtype, seed=int(scaled) + 2 * int(from_state))
    _check(t, A=t["A"], z=t["z"], h0=t["h0"] if from_state else None,
           delta_scale=t["delta_scale"] if scaled else None, dtype=dtype)


@pytest.mark.parametrize("gated", [True, False])
def test_an_a_per_sequence_and_states_that_are_not_a_power_of_two(gated):
    """An A-spectrum scale gives each sequence its own A; the embedded model has 48 states a channel."""
    b, l, d, n = 2, 9, 24, 48
    t = _inputs(b, l, d, n, torch.float32, seed=7)
    _check(t, A=t["A_per_sequence"], z=t["z"] if gated else None, h0=t["h0"], delta_scale=t["delta_scale"],
           dtype=torch.float32)


def test_one_token_is_a_decode_step():
    """A chunk of one token (Triton makes a length of 1 a constant)."""
    t = _inputs(2, 1, 8, 16, torch.float32, seed=9)
    _check(t, A=t["A"], z=t["z"], h0=t["h0"], delta_scale=None, dtype=torch.float32)


@pytest.mark.parametrize("from_state", [False, True])
def test_padded_rows_stop_at_their_own_ends(from_state):
    """Rows of 7, 1 and 4 real tokens padded to 7, token-major: each row's state is its own after its last real
    token, its outputs there as without padding, and zeros past its end."""
    b, l, d, n = 3, 7, 40, 16
    t = _inputs(b, l, d, n, torch.float32, seed=21 + from_state)
    x, dt, z, B, C = (t[k].contiguous() for k in ("x", "dt", "z", "B", "C"))  # token-major
    h0 = t["h0"] if from_state else None
    lengths = [7, 1, 4]
    padding = Padding.of(lengths, torch.device(DEVICE), 4)
    y, h = triton_short_scan.mamba1_short_scan(x, dt, t["dt_bias"], t["A"], B, C, t["D"], z, h0, t["delta_scale"],
                                               padding.ends)
    for row, end in enumerate(lengths):
        alone = slice(row, row + 1)
        want_y, want_h = triton_short_scan.mamba1_short_scan(
            x[alone, :end], dt[alone, :end], t["dt_bias"], t["A"], B[alone, :end], C[alone, :end], t["D"],
            z[alone, :end], None if h0 is None else h0[alone], t["delta_scale"][alone])
        torch.testing.assert_close(h[alone], want_h, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(y[alone, :end], want_y, rtol=1e-6, atol=1e-6)
        assert not y[alone, end:].any()


def test_padded_mamba2_rows_stop_at_their_own_ends():
    b, l, heads, p, groups, n = 3, 6, 4, 24, 2, 40
    t = _mamba2_inputs(b, l, heads, p, groups, n, seed=31)
    delta = torch_ops.discretise(t["dt"], t["dt_bias"], None, (0.0, math.inf))  # (b, l, h)
    lengths = [2, 6, 1]
    padding = Padding.of(lengths, torch.device(DEVICE), 4)
    y, h = triton_short_scan.mamba2_short_scan(t["x"], delta, t["A"], t["B"], t["C"], t["D"], t["h0"], padding.ends)
    for row, end in enumerate(lengths):
        alone = slice(row, row + 1)
        want_y, want_h = triton_short_scan.mamba2_short_scan(t["x"][alone, :end], delta[alone, :end], t["A"],
                                                             t["B"][alone, :end], t["C"][alone, :end], t["D"],
                                                             t["h0"][alone])
        torch.testing.assert_close(h[alone], want_h, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(y[alone, :end], want_y, rtol=1e-6, atol=1e-6)
        assert not y[alone, end:].any()


def test_a_model_on_the_short_scan_equals_its_pytorch_scan(checkpoints, monkeypatch):
    """The mixer hands the scan what the CUDA back-end's short path takes: a chunked prefill of a batch holding a Δ
    set, identity and an A-spectrum set (each sequence its own A and Δ scale), every chunk from the last one's state,
    and a batch of one whose Δ set the mixer folds into A, D and the input."""
    model = load_model(checkpoints["mamba1"], device=DEVICE, dtype="float32", backend="torch").model
    delta, a = delta_and_a_scales(model.config)
    tokens = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    cases = [(tokens, batch_scales([delta, None, a], model.config, DEVICE)),
             (tokens[:1], batch_scales([delta], model.config, DEVICE))]
    wanted = [model.prefill(ids, scales=scales, chunk_len=8) for ids, scales in cases]

    use_short_scans(monkeypatch)
    for (ids, scales), (want, want_state) in zip(cases, wanted):
        got, got_state = model.prefill(ids, scales=scales, chunk_len=8)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for mine, theirs in zip(got_state.ssm, want_state.ssm):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def _mamba2_inputs(b: int, l: int, heads: int, p: int, groups: int, n: int, seed: int) -> dict:
    """Mamba2's scan inputs as the CUDA back-end hands them: x, B and C views of the convolution's (b, l, c) output,
    itself a view of (b, c, l) storage."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    d = heads * p
    xBC = torch.randn(b, d + 2 * groups * n, l, device=DEVICE, generator=g).transpose(1, 2)  # (b, l, c) view
    x, B, C = torch.split(xBC, [d, groups * n, groups * n], dim=-1)
    return dict(x=x.unflatten(-1, (heads, p)), B=B.unflatten(-1, (groups, n)), C=C.unflatten(-1, (groups, n)),
                dt=torch.randn(b, l, heads, device=DEVICE, generator=g) * 0.5 - 1.0,
                dt_bias=torch.randn(heads, device=DEVICE, generator=g) * 0.1,
                A=-torch.exp(torch.randn(heads, device=DEVICE, generator=g) * 0.5),
                A_per_sequence=-torch.exp(torch.randn(b, heads, device=DEVICE, generator=g) * 0.5),
                D=torch.randn(heads, device=DEVICE, generator=g),
                h0=torch.randn(b, heads, p, n, device=DEVICE, generator=g),
                delta_scale=torch.rand(b, heads, device=DEVICE, generator=g) + 0.5)


@pytest.mark.parametrize("from_state", [False, True])
@pytest.mark.parametrize("per_sequence", [False, True])  # an A-spectrum scale: an A per sequence
@pytest.mark.parametrize("length", [1, 19])
def test_the_mamba2_short_scan_equals_the_reference_scan(from_state, per_sequence, length):
    b, heads, p, groups, n = 2, 4, 24, 2, 40  # head channels and states not multiples of the kernel's blocks
    t = _mamba2_inputs(b, length, heads, p, groups, n, seed=length + 2 * from_state + 4 * per_sequence)
    A, h0 = t["A_per_sequence"] if per_sequence else t["A"], t["h0"] if from_state else None
    limit = (0.0, math.inf)
    delta = torch_ops.discretise(t["dt"], t["dt_bias"], t["delta_scale"], limit)  # (b, l, h): the back-end's Δ
    y, h = triton_short_scan.mamba2_short_scan(t["x"], delta, A, t["B"], t["C"], t["D"], h0)
    want_y, want_h = reference.mamba2_scan(t["x"], t["dt"], A, t["B"], t["C"], t["D"], h0, dt_bias=t["dt_bias"],
                                           dt_limit=limit, delta_scale=t["delta_scale"])
    assert y.shape == (b, length, heads, p) and y.dtype == torch.float32 and y.is_contiguous()
    assert h.shape == (b, heads, p, n) and h.is_contiguous()
    torch.testing.assert_close(y, want_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, want_h, rtol=3e-5, atol=3e-5)


def test_a_mamba2_models_chunked_prefill_on_the_short_scan_equals_its_pytorch_scan(checkpoints, monkeypatch):
    """Mamba2's mixer hands the scan what the CUDA back-end's short path takes (its Δ discretised and scaled there): a
    chunked prefill of a batch holding a Δ set, identity and an A-spectrum set, every chunk from the last one's
    state."""
    model = load_model(checkpoints["mamba2"], device=DEVICE, dtype="float32", backend="torch").model
    delta, a = delta_and_a_scales(model.config)
    tokens = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    scales = batch_scales([delta, None, a], model.config, DEVICE)
    want, want_state = model.prefill(tokens, scales=scales, chunk_len=8)

    use_short_scans(monkeypatch)
    got, got_state = model.prefill(tokens, scales=scales, chunk_len=8)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for mine, theirs in zip(got_state.ssm, want_state.ssm):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
