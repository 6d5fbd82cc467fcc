"""INT8 weight-only matrix product for few rows (decode steps) on a GPU, as one Triton kernel.

Batch-1 decode reads every weight once per token, so its time is the weights' bytes over the memory
bandwidth. The kernel reads the int8 weights (half of bfloat16's bytes), converts each tile in registers,
multiplies on the tensor cores with float32 accumulation and applies the per-row scale
and the bias on the way out: out = (x · qᵀ) · scale + bias. (PyTorch's `_weight_int8pack_mm` is slower than
the bfloat16 product on a GPU for these shapes: bench/RESULTS.md.) Triton's interpreter (TRITON_INTERPRET=1)
runs it on CPU tensors for the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_jit import jit

BLOCK_K = 128
MAX_ROWS = 64  # rows of x (sequences in a decode step) one program covers
GEMV_MAX_ROWS = 4  # up to this many rows, one program per (row of x, few weight rows): see int8_matmul
GEMV_TILE = 4096  # int8 elements a GEMV program loads per step (4 KiB)


@jit
def _int8_gemv_kernel(x_ptr: tl.tensor, q_ptr: tl.tensor, scale_ptr: tl.tensor, bias_ptr: tl.tensor, out_ptr: tl.tensor,
                      N: tl.tensor, K: tl.tensor, stride_xm: tl.tensor, stride_qn: tl.tensor, stride_om: tl.tensor,
                      HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr) -> None:
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) weight rows
    m = tl.program_id(1)  # the row of x
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # reduced over K once, after the loop
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + m * stride_xm + kk, mask=kk < K, other=0.0).to(tl.float32)  # (BLOCK_K,)
        q = tl.load(q_ptr + rn[:, None] * stride_qn + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K),
                    other=0)  # (BLOCK_N, BLOCK_K) int8
        acc += q.to(tl.float32) * x[None, :]
    out = tl.sum(acc, axis=1) * tl.load(scale_ptr + rn, mask=rn < N, other=0.0)  # (BLOCK_N,)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + rn, out.to(out_ptr.dtype.element_ty), mask=rn < N)


@jit
def _int8_matmul_kernel(x_ptr: tl.tensor, q_ptr: tl.tensor, scale_ptr: tl.tensor, bias_ptr: tl.tensor,
                        out_ptr: tl.tensor, M: tl.tensor, N: tl.tensor, K: tl.tensor, stride_xm: tl.tensor,
                        stride_qn: tl.tensor, stride_om: tl.tensor, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr) -> None:
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output columns = weight rows
    rm = tl.arange(0, BLOCK_M)  # (BLOCK_M,) rows of x
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K),
                    other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_K)
        q = tl.load(q_ptr + rn[:, None] * stride_qn + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K),
                    other=0)  # (BLOCK_N, BLOCK_K) int8
        w = tl.trans(q.to(tl.float32))  # (BLOCK_K, BLOCK_N)
        # TF32 holds bfloat16 / float16 values and |q| ≤ 127 exactly, so their products are exact on the
        # tensor cores; float32 inputs take the exact (slower) path.
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w, input_precision="tf32")
    acc *= tl.load(scale_ptr + rn, mask=rn < N, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (m, k) with m ≤ MAX_ROWS, contiguous rows; q (n, k) int8; scale (n,) float32; bias (n,) or None.
    Returns x · (q · scale)ᵀ + bias: (m, n) in x's dtype."""
    m, k = x.shape
    n = q.shape[0]
    assert m <= MAX_ROWS and x.stride(1) == 1 and q.is_contiguous() and scale.dtype == torch.float32
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bias_arg = bias if bias is not None else scale  # any pointer: not read without HAS_BIAS
    if m <= GEMV_MAX_ROWS:
        # A few rows: many small programs, each streaming a few weight rows in long contiguous runs, keep
        # enough loads in flight to reach the memory bandwidth (tensor-core tiles of ≥ 16 rows would waste
        # most of their work and leave too few programs); each row of x re-reads the weights from L2.
        block_k = min(GEMV_TILE, triton.next_power_of_2(k))
        block_n = GEMV_TILE // block_k
        grid: tuple[int, ...] = (triton.cdiv(n, block_n), m)
        _int8_gemv_kernel[grid](x, q, scale, bias_arg, out, n, k, x.stride(0), q.stride(0), out.stride(0),
                                HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k)
        return out
    block_m = max(16, triton.next_power_of_2(m))  # tl.dot's smallest tile
    block_n = 32 if n >= 4096 else 16  # enough programs to keep every multiprocessor reading
    grid = (triton.cdiv(n, block_n),)
    _int8_matmul_kernel[grid](x, q, scale, bias_arg, out, m, n, k,
                              x.stride(0), q.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                              IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K)
    return out
