"""A Mamba1 scan from zero plus `add_initial_state` equals the PyTorch scan from that state (on CPU through Triton's
interpreter; compiled on a GPU)."""

import pytest
import torch

pytest.importorskip("triton")  # interpreted on CPU (tests/conftest.py sets TRITON_INTERPRET)
pytestmark = pytest.mark.slow  # Triton's interpreter

from runtime.ops import torch_ops, triton_scan_state  # noqa: E402
from runtime.ops.torch_ops import fold_delta_scale  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(b: int, l: int, d: int, n: int, seed: int) -> dict:
    g = torch.Generator(DEVICE).manual_seed(seed)

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*size, device=DEVICE, generator=g) * scale

    return dict(x=randn(b, l, d), dt=randn(b, l, d, scale=0.5) - 1.0, A=-torch.exp(randn(d, n, scale=0.5)),
                B=randn(b, l, n), C=randn(b, l, n), D=randn(d), z=randn(b, l, d), h0=randn(b, d, n),
                dt_bias=randn(d, scale=0.1), delta_scale=torch.rand(b, d, device=DEVICE, generator=g) + 0.5)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("n", [16, 40])  # 40: not a power of two (nor is the embedded model's 48), shorter steps
def test_a_scan_from_zero_plus_the_initial_states_terms_is_the_scan_from_it(gated, scaled, n):
    b, l, d = 2, 70, 20  # tokens and channels not multiples of the kernel's blocks
    t = _inputs(b, l, d, n, seed=n)
    z = t["z"] if gated else None
    delta_scale = t["delta_scale"] if scaled else None
    identity = torch.eye(d, device=DEVICE)  # out_proj: y itself

    def scan(h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return torch_ops.mamba1_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], z, h0, dt_bias=t["dt_bias"],
                                     delta_scale=delta_scale, out_weight=identity, out_bias=None)

    want_y, want_h = scan(t["h0"])
    y, h = scan(None)
    # the scan's A with a Δ scale folded in, per sequence, as the CUDA back-end hands mamba_ssm's kernel
    A = t["A"] if delta_scale is None else torch.stack([fold_delta_scale(t["A"], t["D"], s)[0] for s in delta_scale])
    triton_scan_state.add_initial_state(y, h, t["h0"], t["dt"], t["dt_bias"], A, t["C"], z)
    torch.testing.assert_close(y, want_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, want_h, rtol=1e-4, atol=1e-4)


def test_strided_views_as_the_cuda_back_end_passes_them():
    """(b, l, ·) views of (b, ·, l) storage, as mamba_ssm's kernel takes and returns its tensors."""
    b, l, d, n = 1, 40, 8, 16
    t = _inputs(b, l, d, n, seed=5)
    channels_first = {k: t[k].transpose(1, 2).contiguous().transpose(1, 2) for k in ("dt", "C", "z")}
    identity = torch.eye(d, device=DEVICE)
    want_y, want_h = torch_ops.mamba1_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["h0"],
                                           dt_bias=t["dt_bias"], delta_scale=None, out_weight=identity, out_bias=None)
    y, h = torch_ops.mamba1_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], None,
                                 dt_bias=t["dt_bias"], delta_scale=None, out_weight=identity, out_bias=None)
    y = y.transpose(1, 2).contiguous().transpose(1, 2)
    triton_scan_state.add_initial_state(y, h, t["h0"], channels_first["dt"], t["dt_bias"], t["A"],
                                        channels_first["C"], channels_first["z"])
    torch.testing.assert_close(y, want_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, want_h, rtol=1e-4, atol=1e-4)
