"""Every fast operator against its sequential reference twin, over sizes, states and decay regimes."""

import pytest
import torch

from runtime.ops import cpu_scan, cpu_scan_grad, reference, torch_ops


@pytest.fixture(params=["compiled", "pytorch"])
def scan_path(request, monkeypatch):
    """Mamba1's scan without autograd on CPU: the compiled kernel (when a C compiler is there), or PyTorch's."""
    if request.param == "pytorch":
        monkeypatch.setattr(cpu_scan, "kernel", lambda: None)
    elif cpu_scan.kernel() is None:
        pytest.skip("no C compiler for the CPU scan kernel")
    return request.param


def _mamba1_inputs(b, l, d, n, seed, decay=1.0, per_sequence_a=False):
    """Raw dt, dt_bias and a per-sequence Δ scale, as the scans take them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, d, generator=g)
    dt, dt_bias = torch.randn(b, l, d, generator=g), torch.randn(d, generator=g) - 1
    delta_scale = (torch.rand(b, d, generator=g) + 0.5) * decay
    A = -(torch.rand(b if per_sequence_a else 1, d, n, generator=g) * 4 + 0.1)
    A = A if per_sequence_a else A[0]
    B, C = torch.randn(b, l, n, generator=g), torch.randn(b, l, n, generator=g)
    D, z = torch.randn(d, generator=g), torch.randn(b, l, d, generator=g)
    h0 = torch.randn(b, d, n, generator=g)
    return dict(x=x, dt=dt, dt_bias=dt_bias, delta_scale=delta_scale, A=A, B=B, C=C, D=D, z=z, h0=h0)


def _mamba1_scan(ops, v, z, h0, **kw):
    """A back-end's scan with an identity output projection, so that its output is y itself."""
    return ops.mamba1_scan(v["x"], v["dt"], v["A"], v["B"], v["C"], v["D"], z, h0, dt_bias=v["dt_bias"],
                           delta_scale=v["delta_scale"], out_weight=torch.eye(v["x"].shape[-1]), out_bias=None, **kw)


def _fast_and_reference(v, z, h0, **kw):
    return _mamba1_scan(torch_ops, v, z, h0, **kw), _mamba1_scan(reference, v, z, h0)


@pytest.mark.parametrize("l", [1, 7, 64, 200])
@pytest.mark.parametrize("decay", [0.05, 1.0, 30.0])  # 30: a channel's state is forgotten within a step
@pytest.mark.parametrize("with_state", [False, True])
def test_mamba1_scan_matches_reference(l, decay, with_state, scan_path):
    v = _mamba1_inputs(2, l, 12, 5, seed=l, decay=decay)
    (y, h), (y_ref, h_ref) = _fast_and_reference(v, v["z"], v["h0"] if with_state else None)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)


def test_mamba1_scan_with_per_sequence_a_and_small_blocks(scan_path):
    v = _mamba1_inputs(3, 50, 8, 4, seed=3, per_sequence_a=True)
    (y, h), (y_ref, h_ref) = _fast_and_reference(v, None, v["h0"], block=8)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)


def test_mamba1_scan_super_blocks_carry_the_state(monkeypatch):
    monkeypatch.setattr(cpu_scan, "kernel", lambda: None)  # the PyTorch scan's super-blocks
    monkeypatch.setattr(torch_ops, "SUPERBLOCK_ELEMENTS", 2 * 4 * 8 * 4)  # 2 blocks of 4 tokens per super-block
    v = _mamba1_inputs(1, 37, 8, 4, seed=11)
    (y, h), (y_ref, h_ref) = _fast_and_reference(v, v["z"], v["h0"], block=4)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)


def test_mamba1_scan_in_place_and_differentiable_paths_agree(monkeypatch):
    """Without autograd the scan runs in place in reused buffers; with a scale that needs a gradient it runs
    out of place. Same operations in the same order: the same result, over several super-blocks and a
    partial last block, and the differentiable one does back-propagate."""
    monkeypatch.setattr(cpu_scan, "kernel", lambda: None)  # PyTorch's scan without autograd, not the kernel
    monkeypatch.setattr(cpu_scan_grad, "kernels", lambda: None)  # and with autograd
    monkeypatch.setattr(torch_ops, "SUPERBLOCK_ELEMENTS", 3 * 4 * 8 * 4)
    v = _mamba1_inputs(2, 45, 8, 4, seed=12)
    with torch.no_grad():
        y_fast, h_fast = _mamba1_scan(torch_ops, v, v["z"], v["h0"], block=4)
    scale = v["delta_scale"].clone().requires_grad_()
    y, h = _mamba1_scan(torch_ops, {**v, "delta_scale": scale}, v["z"], v["h0"], block=4)
    torch.testing.assert_close(y_fast, y.detach(), rtol=0, atol=0)
    torch.testing.assert_close(h_fast, h.detach(), rtol=0, atol=0)
    (y.square().sum() + h.sum()).backward()
    assert scale.grad is not None and scale.grad.abs().sum() > 0


@pytest.mark.parametrize("ops", [torch_ops, reference], ids=["torch", "reference"])
def test_mamba1_steps_continue_the_scan(ops):
    v = _mamba1_inputs(2, 9, 6, 3, seed=4)
    x, dt, A, B, C, D, z, h0 = (v[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "h0"))
    y_ref, h_ref = _mamba1_scan(reference, v, z, h0)
    h, A_log = h0.clone(), torch.log(-A)
    ys = [ops.mamba1_step(h, x[:, t], dt[:, t], B[:, t], C[:, t], D, z[:, t], dt_bias=v["dt_bias"], A_log=A_log,
                          delta_scale=v["delta_scale"], a_scale=None) for t in range(9)]
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)


def _mamba2_inputs(b, l, h, p, g, n, seed, per_sequence_a=False):
    """Raw dt, dt_bias, a per-sequence Δ scale and a Δ limit, as the scans take them."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen)
    dt, dt_bias = torch.randn(b, l, h, generator=gen), torch.randn(h, generator=gen) - 1
    A = -(torch.rand(b if per_sequence_a else 1, h, generator=gen) * 4 + 0.1)
    A = A if per_sequence_a else A[0]
    B, C = torch.randn(b, l, g, n, generator=gen), torch.randn(b, l, g, n, generator=gen)
    D, h0 = torch.randn(h, generator=gen), torch.randn(b, h, p, n, generator=gen)
    delta = dict(dt_bias=dt_bias, dt_limit=(0.01, 2.0), delta_scale=torch.rand(b, h, generator=gen) + 0.5)
    return x, dt, A, B, C, D, h0, delta


@pytest.mark.parametrize("l", [1, 13, 64, 150])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("per_sequence_a", [False, True])
def test_mamba2_scan_matches_reference(l, with_state, per_sequence_a):
    x, dt, A, B, C, D, h0, delta = _mamba2_inputs(2, l, 4, 3, 2, 5, seed=l, per_sequence_a=per_sequence_a)
    h0 = h0 if with_state else None
    y, h = torch_ops.mamba2_scan(x, dt, A, B, C, D, h0, **delta, block=32)
    y_ref, h_ref = reference.mamba2_scan(x, dt, A, B, C, D, h0, **delta)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ops", [torch_ops, reference], ids=["torch", "reference"])
def test_mamba2_steps_continue_the_scan(ops):
    x, dt, A, B, C, D, h0, delta = _mamba2_inputs(2, 6, 4, 3, 2, 5, seed=9)
    y_ref, h_ref = reference.mamba2_scan(x, dt, A, B, C, D, h0, **delta)
    h, A_log = h0.clone(), torch.log(-A)
    ys = [ops.mamba2_step(h, x[:, t], dt[:, t], B[:, t], C[:, t], D, A_log=A_log, a_scale=None, **delta)
          for t in range(6)]
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ops", [torch_ops, reference], ids=["torch", "reference"])
def test_conv_prefill_from_state_and_steps_agree(ops):
    g = torch.Generator().manual_seed(5)
    x, w, bias = torch.randn(2, 11, 6, generator=g), torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    expected = torch.nn.functional.silu(torch.nn.functional.conv1d(
        torch.nn.functional.pad(x.transpose(1, 2), (3, 0)), w[:, None], bias, groups=6)).transpose(1, 2)
    whole, state = ops.causal_conv1d(x, w, bias, None)
    torch.testing.assert_close(whole, expected)
    torch.testing.assert_close(state, x[:, -3:].transpose(1, 2))
    first, mid = ops.causal_conv1d(x[:, :2], w, bias, None)  # shorter than the kernel width
    rest, end = ops.causal_conv1d(x[:, 2:], w, bias, mid)
    torch.testing.assert_close(torch.cat((first, rest), 1), whole)
    torch.testing.assert_close(end, state)
    stepped = mid.clone()
    outs = [ops.causal_conv1d_step(x[:, t], stepped, w, bias) for t in range(2, 11)]
    torch.testing.assert_close(torch.stack(outs, 1), rest)
    torch.testing.assert_close(stepped, state)


@pytest.mark.parametrize("ops", [torch_ops, reference], ids=["torch", "reference"])
def test_steps_on_pool_rows_equal_steps_on_the_gathered_batch(ops):
    """With `slots`, a step reads and writes those rows of a pool and leaves the other rows alone."""
    g = torch.Generator().manual_seed(5)
    slots = torch.tensor([3, 0])
    b, d, n, k = 2, 6, 3, 4
    x, dt, z = (torch.randn(b, d, generator=g) for _ in range(3))
    B, C = torch.randn(b, n, generator=g), torch.randn(b, n, generator=g)
    A_log, a_scale = torch.randn(d, n, generator=g), torch.rand(b, d, n, generator=g) + 0.5
    weight = torch.randn(d, k, generator=g)
    steps = {
        "conv": (torch.randn(5, d, k - 1, generator=g),
                 lambda state, rows: ops.causal_conv1d_step(x, state, weight, None, rows)),
        "mamba1": (torch.randn(5, d, n, generator=g),
                   lambda state, rows: ops.mamba1_step(state, x, dt, B, C, torch.ones(d), z, dt_bias=torch.zeros(d),
                                                       A_log=A_log, delta_scale=None, a_scale=a_scale, slots=rows)),
        "mamba2": (torch.randn(5, 2, 3, n, generator=g),
                   lambda state, rows: ops.mamba2_step(state, x.view(b, 2, 3), dt[:, :2], B[:, None], C[:, None],
                                                       torch.ones(2), dt_bias=torch.zeros(2), dt_limit=(0.0, 9.0),
                                                       A_log=A_log[0, :2], delta_scale=None, a_scale=a_scale[:, 0, :2],
                                                       slots=rows)),
    }
    for name, (pool, step) in steps.items():
        batch, stepped = pool[slots].clone(), pool.clone()
        want = step(batch, None)
        got = step(stepped, slots)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(stepped[slots], batch, rtol=0, atol=0, msg=name)
        others = torch.tensor([1, 2, 4])
        assert torch.equal(stepped[others], pool[others]), name
