"""The compiled CPU scan: against the sequential reference at the embedded model's state size, and what
happens without a working compiler (the PyTorch scan runs, and the server keeps its answers)."""

import logging
import os
import shutil

import pytest
import torch

from runtime.ops import cpu_scan, reference, torch_ops


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """kernel() as on first use, with its cache in tmp_path; the process's kernel is restored afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu_scan.kernel.cache_clear()
    yield tmp_path / "mamba-extend"
    cpu_scan.kernel.cache_clear()


def _scan_inputs(b, l, d, n, seed):
    g = torch.Generator().manual_seed(seed)
    delta = torch.rand(b, l, d, generator=g) * 2  # Δ·A reaches −200: the exponential's clamp is exercised
    A = -(torch.rand(b, d, n, generator=g) * 100 + 0.01)  # per sequence, as A-spectrum scales make it
    x, B, C = torch.randn(b, l, d, generator=g), torch.randn(b, l, n, generator=g), torch.randn(b, l, n, generator=g)
    return delta, x, A, B, C, torch.randn(b, d, n, generator=g)


def _reference(x, delta, A, B, C, h0):
    """The reference scan of a discretised Δ (b, l, d) without the D skip, the gate or a projection."""
    d = x.shape[-1]
    return reference.mamba1_scan(x, torch.log(torch.expm1(delta)), A, B, C, torch.zeros(d), None, h0,
                                 dt_bias=torch.zeros(d), delta_scale=None, out_weight=torch.eye(d), out_bias=None)


@pytest.mark.skipif(cpu_scan.kernel() is None, reason="no C compiler for the CPU scan kernel")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_kernel_matches_the_sequential_scan_at_d_state_48(threads, monkeypatch):
    """Two sequences, 150 tokens (chunks of 64 and a partial one), channels shared by 1-3 threads."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    delta, x, A, B, C, h0 = _scan_inputs(2, 150, 10, 48, seed=threads)
    y, h = cpu_scan.mamba1_scan(delta, x, A, B, C, h0)
    y_ref, h_ref = _reference(x, delta, A, B, C, h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(h0, h)  # the initial state is read, not overwritten


def test_without_a_compiler_the_pytorch_scan_runs(fresh_kernel, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler")
    assert cpu_scan.kernel() is None
    delta, x, A, B, C, h0 = _scan_inputs(1, 20, 4, 6, seed=0)
    dt = torch.log(torch.expm1(delta))  # softplus(dt) = Δ
    y, h = torch_ops.mamba1_scan(x, dt, A, B, C, torch.zeros(4), None, h0, dt_bias=torch.zeros(4), delta_scale=None,
                                 out_weight=torch.eye(4), out_bias=None)
    y_ref, h_ref = _reference(x, delta, A, B, C, h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)


def test_a_failing_compile_is_logged_and_leaves_no_library(fresh_kernel, monkeypatch, caplog):
    monkeypatch.setenv("CC", shutil.which("false"))
    with caplog.at_level(logging.WARNING, logger=cpu_scan.__name__):
        assert cpu_scan.kernel() is None
    assert "cpu_scan.c" in caplog.text and "failed" in caplog.text
    assert not list(fresh_kernel.glob("*.so"))


@pytest.mark.skipif(cpu_scan.kernel() is None, reason="no C compiler for the CPU scan kernel")
def test_an_unwritable_cache_is_logged_and_falls_back(fresh_kernel, monkeypatch, caplog):
    fresh_kernel.parent.joinpath("mamba-extend").write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger=cpu_scan.__name__):
        assert cpu_scan.kernel() is None
    assert "failed" in caplog.text


@pytest.mark.skipif(cpu_scan.kernel() is None, reason="no C compiler for the CPU scan kernel")
def test_the_library_is_built_once_and_reused(fresh_kernel):
    assert cpu_scan.kernel() is not None
    (library,) = fresh_kernel.glob("cpu_scan-*.so")
    built = library.stat().st_mtime_ns
    cpu_scan.kernel.cache_clear()
    assert cpu_scan.kernel() is not None
    assert [library] == list(fresh_kernel.glob("*.so")) and library.stat().st_mtime_ns == built
    assert not [p for p in os.listdir(fresh_kernel) if not p.endswith(".so")]  # no scratch left behind


def test_inputs_the_kernel_cannot_read_take_the_pytorch_scan():
    """A float64 A (the kernel reads float32 only) still gives the sequential scan's result."""
    delta, x, A, B, C, h0 = _scan_inputs(1, 30, 4, 6, seed=1)
    dt = torch.log(torch.expm1(delta))
    y, h = torch_ops.mamba1_scan(x, dt, A.double(), B, C, torch.zeros(4), None, h0, dt_bias=torch.zeros(4),
                                 delta_scale=None, out_weight=torch.eye(4), out_bias=None)
    y_ref, h_ref = _reference(x, delta, A, B, C, h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.float(), h_ref, rtol=1e-4, atol=1e-4)
