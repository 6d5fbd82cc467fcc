"""The compiled Mamba1 decode step against the composed PyTorch step it replaces: alone, on a pool's rows, with
every kind of scale, inside the model (INT8 included), and what happens without a compiler."""

import dataclasses

import pytest
import torch
from checkpoints import VOCAB

from runtime import ScaleMethod, ScaleSet, batch_scales, load_model
from runtime.ops import cpu_decode, torch_ops
from runtime.ops.contract import Mamba1Weights

needs_kernel = pytest.mark.skipif(cpu_decode.kernel() is None, reason="no C compiler for the CPU decode kernel")


def _step_inputs(b, d, n, r, k, seed, conv_bias, delta_scale, a_scale):
    g = torch.Generator().manual_seed(seed)
    projected = torch.randn(4, b, 2 * d, generator=g)  # per step in_proj's output: x, z are views, rows 2d apart
    weights = Mamba1Weights(
        conv_weight=torch.randn(d, k, generator=g) * 0.5,
        conv_bias=torch.randn(d, generator=g) if conv_bias else None,
        x_proj_weight=torch.randn(r + 2 * n, d, generator=g) / d ** 0.5,
        dt_proj_weight=torch.randn(d, r, generator=g) / r ** 0.5,
        dt_bias=torch.randn(d, generator=g) - 1,
        A_log=torch.log(torch.rand(d, n, generator=g) * 16 + 0.5),
        D=torch.randn(d, generator=g),
    )
    scales = dict(a_scale=torch.rand(b, d, n, generator=g) * 1.5 + 0.25 if a_scale else None,
                  delta_scale=torch.rand(b, d, generator=g) * 1.5 + 0.25 if delta_scale else None)
    return projected, weights, scales


def _decode(step, projected, conv_state, h, weights, scales, slots):
    x, z = projected.chunk(2, dim=-1)
    return step(x, z, conv_state, h, weights, **scales, slots=slots)


def _composed(*args, **kwargs):
    return torch_ops.composed_mamba1_decode(torch_ops.causal_conv1d_step, torch_ops.mamba1_step, *args, **kwargs)


@needs_kernel
@pytest.mark.parametrize("rows", [None, [3, 0, 4]])  # batch 1 on its own state; three rows of a pool of six
@pytest.mark.parametrize("delta_scale,a_scale", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_kernel_equals_the_composed_step(rows, delta_scale, a_scale, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    b, d, n, r, k = (1 if rows is None else len(rows)), 40, 48, 4, 4
    projected, weights, scales = _step_inputs(b, d, n, r, k, seed=threads, conv_bias=rows is None,
                                              delta_scale=delta_scale, a_scale=a_scale)
    g = torch.Generator().manual_seed(9)
    pools = 1 if rows is None else 6
    conv, h = torch.randn(pools, d, k - 1, generator=g), torch.randn(pools, d, n, generator=g)
    slots = None if rows is None else torch.tensor(rows)
    conv_ref, h_ref = conv.clone(), h.clone()
    inputs = (*(getattr(weights, f.name) for f in dataclasses.fields(weights)), *scales.values())
    assert cpu_decode.runs((conv, h), inputs, rows=projected[0].chunk(2, dim=-1))
    for t in range(4):  # steps on the states the previous ones left
        got = _decode(torch_ops.mamba1_decode, projected[t], conv, h, weights, scales, slots)
        want = _decode(_composed, projected[t], conv_ref, h_ref, weights, scales, slots)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv, conv_ref, rtol=0, atol=0)


def _pool_steps(model, scales, steps=4):
    """Three sequences stepped on rows 2, 0, 3 of a pool of four after a prompt. Returns the logits (steps, 3, V)
    and the pool."""
    tokens = torch.randint(0, VOCAB, (3, 6 + steps), generator=torch.Generator().manual_seed(1))
    slots = torch.tensor([2, 0, 3])
    pool = model.new_state(4)
    _, state = model.prefill(tokens[:, :6], scales=scales)
    pool.write_rows(slots, state)
    return torch.stack([model.step(tokens[:, t], pool, scales, slots) for t in range(6, 6 + steps)]), pool


@needs_kernel
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_model_steps_on_the_kernel_equal_the_pytorch_steps(checkpoints, quantize, monkeypatch):
    """Per-row scale sets of both methods (and none) in one batch; INT8 projections keep the composed step."""
    loaded = load_model(checkpoints["mamba1"], quantize=quantize)
    config = loaded.config
    g = torch.Generator().manual_seed(3)
    sets = [ScaleSet(ScaleMethod.DELTA, tuple(torch.rand(config.d_inner, generator=g) + 0.5
                                              for _ in range(config.n_layer))),
            None,
            ScaleSet(ScaleMethod.A_SPECTRUM, tuple(torch.rand(config.d_inner, config.d_state, generator=g) + 0.5
                                                   for _ in range(config.n_layer)))]
    scales = batch_scales(sets, config, "cpu")
    fused_logits, fused_pool = _pool_steps(loaded.model, scales)
    monkeypatch.setattr(cpu_decode, "kernel", lambda: None)
    torch_logits, torch_pool = _pool_steps(loaded.model, scales)
    torch.testing.assert_close(fused_logits, torch_logits, rtol=1e-4, atol=1e-4)
    for mine, theirs in zip(fused_pool.ssm + fused_pool.conv, torch_pool.ssm + torch_pool.conv):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def test_without_a_compiler_the_pytorch_step_runs(checkpoints, monkeypatch, tmp_path):
    model = load_model(checkpoints["mamba1"]).model
    expected, _ = _pool_steps(model, None)  # on the kernel where one builds
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler")
    cpu_decode.kernel.cache_clear()
    try:
        assert cpu_decode.kernel() is None
        got, _ = _pool_steps(model, None)
    finally:
        cpu_decode.kernel.cache_clear()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not list(tmp_path.rglob("*.so"))
