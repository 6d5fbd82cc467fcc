"""The compiled Mamba1 scan backward on CPU (cpu_scan_grad): gradcheck in float64, float32 against PyTorch's
autograd over the blocked scan, and the layer's calibration path (A-spectrum and Δ scales) taking it."""

import pytest
import torch

from runtime import MAMBA1, MambaLM, ModelConfig, ScaleMethod, ScaleSet, batch_scales
from runtime.backend import select_backend
from runtime.ops import cpu_scan_grad, torch_ops
from runtime.ops.reference import _mamba1_recurrence

pytestmark = pytest.mark.skipif(cpu_scan_grad.kernels() is None, reason="no C compiler for the CPU scan kernels")


def _inputs(b: int, l: int, d: int, n: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """delta, x (b, l, d); A (b, d, n); B, C (b, l, n); h0 (b, d, n); all requiring gradients."""
    g = torch.Generator().manual_seed(seed)
    delta = torch.rand(b, l, d, generator=g) * 0.5
    A = -(torch.rand(b, d, n, generator=g) * 2 + 0.1)
    x, B, C = torch.randn(b, l, d, generator=g), torch.randn(b, l, n, generator=g), torch.randn(b, l, n, generator=g)
    return [t.to(dtype).requires_grad_() for t in (delta, x, A, B, C, torch.randn(b, d, n, generator=g))]


@pytest.mark.parametrize("length", [1, 64, 150])  # one token, one whole chunk, two chunks and a partial one
def test_gradcheck_in_float64(length):
    inputs = _inputs(2, length, 3, 4, torch.float64)
    # fast mode: the Jacobian along random directions against finite differences along the same directions,
    # to tolerances tight enough to catch a gradient 1% off (the defaults are not)
    assert torch.autograd.gradcheck(cpu_scan_grad.Mamba1Scan.apply, inputs, fast_mode=True, rtol=1e-6, atol=1e-8)
    if length < 64:
        assert torch.autograd.gradcheck(cpu_scan_grad.Mamba1Scan.apply, inputs)  # every entry


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_float32_gradients_match_autograd_over_the_sequential_scan(threads, monkeypatch):
    """d_state 48, 150 tokens (two chunks and a partial one), channels shared by 1-3 threads: the threads'
    shares of dB and dC are summed."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    inputs = _inputs(2, 150, 7, 48, torch.float32, seed=threads)
    delta, x, A, B, C, h0 = inputs
    y, h = cpu_scan_grad.mamba1_scan(*inputs)
    y_ref, h_ref = (t.to(y.dtype) for t in _mamba1_recurrence(x, delta, A, B, C, torch.zeros(7), None, h0))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    ours = torch.autograd.grad((y * dy).sum() + (h * dh).sum(), inputs)
    theirs = torch.autograd.grad((y_ref * dy).sum() + (h_ref * dh).sum(), inputs)
    for name, mine, reference in zip(("delta", "x", "A", "B", "C", "h0"), ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item(),
                                   msg=lambda m, name=name: f"d{name}: {m}")


def _tiny_model() -> MambaLM:
    config = ModelConfig(arch=MAMBA1, d_model=16, n_layer=2, vocab_size=64, d_state=8)
    torch.manual_seed(0)
    model = MambaLM(config, select_backend("torch", "cpu")).requires_grad_(False)
    with torch.no_grad():
        for block in model.layers:
            block.mixer.A_log.uniform_(-1, 1)
            block.mixer.dt_proj.bias.uniform_(-3, 0)
    return model


def _scale_gradients(model: MambaLM, method: ScaleMethod, granularity: str) -> list[torch.Tensor]:
    """d loss / d log-scale per layer, the loss a function of every position's hidden state."""
    torch.manual_seed(1)
    tokens = torch.randint(0, 64, (3, 80))
    init = ScaleSet.identity(model.config, method, granularity)
    logs = [(torch.rand_like(s) - 0.5).requires_grad_() for s in init.layers]
    scale_set = ScaleSet(method, tuple(torch.exp(p) for p in logs))
    hidden, _ = model.hidden_states(tokens, scales=batch_scales([scale_set] * 3, model.config, "cpu"))
    (hidden * torch.linspace(-1, 1, hidden.shape[-1])).sum().backward()
    return [p.grad for p in logs]


@pytest.mark.parametrize(("method", "granularity"), [(ScaleMethod.A_SPECTRUM, "channel"),
                                                     (ScaleMethod.A_SPECTRUM, "channel_state"),
                                                     (ScaleMethod.DELTA, "channel")])
def test_a_layer_takes_the_kernel_and_its_scale_gradients_match_the_blocked_scan(method, granularity, monkeypatch):
    model = _tiny_model()
    calls = []
    apply = cpu_scan_grad.Mamba1Scan.apply
    monkeypatch.setattr(cpu_scan_grad.Mamba1Scan, "apply", lambda *args: calls.append(1) or apply(*args))
    ours = _scale_gradients(model, method, granularity)
    assert len(calls) == model.config.n_layer
    monkeypatch.setattr(cpu_scan_grad, "runs", lambda delta, A: False)  # the blocked scan under autograd
    theirs = _scale_gradients(model, method, granularity)
    assert len(calls) == model.config.n_layer
    for mine, reference in zip(ours, theirs):
        assert reference.abs().max() > 0
        # float32 sums in another order: an element that nearly cancels differs by up to ~2e-5 of the largest
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=5e-5 * reference.abs().max().item())


def test_without_gradients_the_forward_kernel_runs(monkeypatch):
    monkeypatch.setattr(cpu_scan_grad.Mamba1Scan, "apply", lambda *args: pytest.fail("the autograd function ran"))
    delta, x, A, B, C, h0 = (t.detach() for t in _inputs(1, 20, 4, 6, torch.float32))
    dt = torch.log(torch.expm1(delta))  # softplus(dt) = Δ
    torch_ops.mamba1_scan(x, dt, A, B, C, torch.zeros(4), None, h0, dt_bias=torch.zeros(4), delta_scale=None,
                          out_weight=torch.eye(4), out_bias=None)
