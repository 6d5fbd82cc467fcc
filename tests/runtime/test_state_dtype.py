"""SSM states stored narrower than float32 (vLLM's mamba_ssm_cache_dtype): every decode step widens the stored
values, computes in float32 and rounds once as it stores, whatever the back-end; a prefill starts from the widened
values and stores its final state rounded; the model's steps on such a pool stay close to float32 ones."""

import pytest
import torch

from runtime import PoolRows, load_model
from runtime.decode_graph import DecodeGraphs
from runtime.ops import torch_ops

D, N, HEADS, P, GROUPS = 24, 8, 3, 8, 1


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, like):
    """Seeded on the CPU (the same values on every device), then moved to `like`'s device."""
    return torch.randn(*shape, generator=_g(seed)).to(like.device)


def _mamba1_step(ops, h, slots):
    b = 2
    x, dt, z = (_randn(b, D, seed=i, like=h) for i in range(3))
    B, C = (_randn(b, N, seed=i, like=h) for i in (3, 4))
    skip, dt_bias = (_randn(D, seed=i, like=h) for i in (5, 6))
    A_log = _randn(D, N, seed=7, like=h)
    return ops.mamba1_step(h, x, dt, B, C, skip, z, dt_bias=dt_bias, A_log=A_log, delta_scale=None, a_scale=None,
                           slots=slots)


def _mamba2_step(ops, h, slots):
    b = 2
    x = _randn(b, HEADS, P, seed=0, like=h)
    dt = _randn(b, HEADS, seed=1, like=h)
    B, C = (_randn(b, GROUPS, N, seed=i, like=h) for i in (2, 3))
    skip, dt_bias, A_log = (_randn(HEADS, seed=i, like=h) for i in (4, 5, 6))
    return ops.mamba2_step(h, x, dt, B, C, skip, dt_bias=dt_bias, dt_limit=(0.0, float("inf")), A_log=A_log,
                           delta_scale=None, a_scale=None, slots=slots)


STEPS = {"mamba1": (_mamba1_step, (D, N)), "mamba2": (_mamba2_step, (HEADS, P, N))}


@pytest.mark.parametrize("arch", STEPS)
@pytest.mark.parametrize("pooled", [False, True])
def test_a_narrow_state_steps_in_float32_and_rounds_once(arch, pooled):
    step, shape = STEPS[arch]
    rows = 5 if pooled else 2
    narrow = (torch.randn(rows, *shape, generator=_g(9)) * 3).bfloat16()
    wide = narrow.float()  # the same values, stored in float32
    slots = torch.tensor([3, 1]) if pooled else None
    got = step(torch_ops, narrow, slots)
    want = step(torch_ops, wide, slots)
    assert torch.equal(got, want)  # the output of the float32 state, not of a bfloat16 computation
    assert narrow.dtype == torch.bfloat16 and torch.equal(narrow, wide.bfloat16())  # rounded once, as stored
    if pooled:
        assert torch.equal(narrow[[0, 2, 4]].float(), wide[[0, 2, 4]])  # rows no sequence owns are left alone


@pytest.mark.slow  # Triton's interpreter on a CPU
@pytest.mark.parametrize("arch", STEPS)
def test_the_triton_steps_round_a_narrow_state_as_pytorch_does(arch):
    pytest.importorskip("triton")
    from runtime.ops import triton_mamba2, triton_ssm
    step, shape = STEPS[arch]
    kernels = triton_ssm if arch == "mamba1" else triton_mamba2
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter takes CPU tensors, a GPU's Triton not
    pool = (torch.randn(5, *shape, generator=_g(9)) * 3).bfloat16()
    slots = torch.tensor([3, 1])
    mine, theirs = pool.to(device), pool.clone()
    got = step(kernels, mine, slots.to(device)).cpu()
    torch.testing.assert_close(got, step(torch_ops, theirs, slots), rtol=1e-5, atol=1e-5)
    assert mine.dtype == torch.bfloat16
    torch.testing.assert_close(mine.float().cpu(), theirs.float(), rtol=8e-3, atol=1e-5)  # at most one rounding apart


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_a_model_on_a_bfloat16_state_pool_stays_close_to_float32(checkpoints, arch, device):
    """On the CPU the float32 pool takes the compiled decode and the bfloat16 one PyTorch's; on CUDA both run
    the Triton steps captured in decode graphs."""
    model = load_model(checkpoints[arch], device=device, dtype="float32").model
    prompt = torch.randint(0, model.config.vocab_size, (2, 40), generator=_g(0)).to(device)
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        pool = model.new_state(4, dtype)
        assert all(t.dtype == dtype for t in pool.ssm)
        slots = torch.tensor([2, 0], device=device)
        half = prompt.shape[1] // 2
        for start in (0, half):  # the second chunk continues the state the first stored
            model.prefill_rows(prompt[:, start:start + half], PoolRows(pool, slots, None if start == 0 else
                                                                       torch.zeros(2, dtype=torch.bool,
                                                                                   device=device)))
        graphs = DecodeGraphs(model, pool) if device == "cuda" else None
        tokens, steps = prompt[:, -1], []
        for _ in range(8):
            step = graphs.step(tokens, slots, None) if graphs else model.step(tokens, pool, slots=slots)
            steps.append(step.clone())  # a graph's logits are overwritten by its next step
            tokens = steps[-1].argmax(-1)
        logits[dtype] = torch.stack(steps)  # (8, 2, V)
    wide, narrow = logits[torch.float32], logits[torch.bfloat16]
    assert not torch.equal(wide, narrow)  # the states were rounded
    torch.testing.assert_close(narrow, wide, rtol=0.0, atol=0.05 * wide.abs().max().item())
