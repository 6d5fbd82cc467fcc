"""Fused Triton kernels for a decode step's generic pieces, behind the operator contract (`contract.Ops`):
  - `add_rms_norm`: a block's residual connection and the next block's RMSNorm;
  - `add_rms_norm_linear`: the same followed by the next block's in_proj, one kernel for a batch of a few;
  - `linear`: a projection (out_proj) of a batch of a few, where cuBLAS's kernels leave most of the GPU idle;
  - `rows_matmul`: a projection of a batch of some dozens, the weights streamed once.
Each is one kernel where PyTorch runs several (a captured decode graph's step time is its kernels' GPU time).
Results are PyTorch's up to the order of float32 sums; tests compare them. Triton's interpreter
(TRITON_INTERPRET=1) runs these kernels on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_jit import jit

Tensor = torch.Tensor

GEMV_MAX_ROWS = 4  # sequences up to which a projection (with its RMSNorm) runs as one GEMV kernel
GEMV_TILE = 8192  # weight elements a GEMV program loads, in one tile (16 KiB of bfloat16)
GEMV_WARPS = 8
# Each GEMV program of add_rms_norm_linear recomputes the norm of its row: where a program would take fewer weight
# rows than this (GEMV_TILE over the row's width rounded up to a power of two), the norm's reads rival the
# weights', and the norm's own kernel then cuBLAS is faster (bench.gpu_kernels: the Mamba2 2.7b shape's in_proj,
# 2 rows a program). The other measured shapes take 4 or more.
GEMV_NORM_MIN_ROWS = 4
# Past GEMV_MAX_ROWS and up to ROWS_MATMUL_MAX_ROWS sequences a projection is `rows_matmul`, a matrix product that
# streams the weights once with every sequence's rows in one block; past it, cuBLAS. Its launch shape and whether it
# runs at all (ROWS_MATMUL_MAX_ROWS = GEMV_MAX_ROWS: never) are `python -m bench.gpu_kernels --batch 64`'s to choose.
ROWS_MATMUL_MAX_ROWS = GEMV_MAX_ROWS
ROWS_MATMUL_BLOCK_N = 32
ROWS_MATMUL_BLOCK_K = 128
ROWS_MATMUL_STAGES = 4
ROWS_MATMUL_WARPS = 4


@jit
def _add_rms_norm_row(residual_ptr: tl.tensor, update_ptr: tl.tensor, weight_ptr: tl.tensor,
                      new_residual_ptr: tl.tensor, i: tl.tensor, live: tl.tensor, width: tl.tensor, eps: tl.tensor,
                      stored_width: tl.tensor, HAS_UPDATE: tl.constexpr) -> tl.tensor:
    """One sequence's residual (+ update), rounded to the residual stream's dtype as PyTorch's sum rounds it
    and stored (its first `stored_width` columns: width, or 0 for none), and its RMSNorm (float32) over the
    columns i (BLOCK,) ⊇ [0, width)."""
    r = tl.load(residual_ptr + i, mask=live, other=0.0).to(tl.float32)
    if HAS_UPDATE:
        r += tl.load(update_ptr + i, mask=live, other=0.0).to(tl.float32)
    r = r.to(new_residual_ptr.dtype.element_ty)
    tl.store(new_residual_ptr + i, r, mask=i < stored_width)
    r = r.to(tl.float32)
    inverse_rms = 1.0 / tl.sqrt(tl.sum(r * r, axis=0) / width + eps)
    return r * inverse_rms * tl.load(weight_ptr + i, mask=live, other=0.0).to(tl.float32)


@jit
def _add_rms_norm_kernel(residual_ptr: tl.tensor, update_ptr: tl.tensor, weight_ptr: tl.tensor,
                         new_residual_ptr: tl.tensor, out_ptr: tl.tensor, width: tl.tensor, eps: tl.tensor,
                         stride_rb: tl.tensor, stride_ub: tl.tensor, stride_nb: tl.tensor, stride_ob: tl.tensor,
                         HAS_UPDATE: tl.constexpr, BLOCK: tl.constexpr) -> None:
    b = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    live = i < width
    out = _add_rms_norm_row(residual_ptr + b * stride_rb, update_ptr + b * stride_ub, weight_ptr,
                            new_residual_ptr + b * stride_nb, i, live, width, eps, width, HAS_UPDATE)
    tl.store(out_ptr + b * stride_ob + i, out.to(out_ptr.dtype.element_ty), mask=live)


def add_rms_norm(residual: Tensor, update: Tensor | None, weight: Tensor, eps: float,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """`contract.Ops.add_rms_norm` in one kernel: residual (b, D), update (b, D) or None, weight (D,)."""
    b, width = residual.shape
    assert residual.stride(1) == 1 and (update is None or update.stride(1) == 1) and weight.is_contiguous()
    new_residual = torch.empty_like(residual)
    out = torch.empty(b, width, dtype=dtype, device=residual.device)
    _add_rms_norm_kernel[(b,)](residual, update if update is not None else residual, weight, new_residual, out, width,
                               eps, residual.stride(0), update.stride(0) if update is not None else 0,
                               new_residual.stride(0), out.stride(0), HAS_UPDATE=update is not None,
                               BLOCK=triton.next_power_of_2(width))
    return new_residual, out


@jit
def _gemv_kernel(x_ptr: tl.tensor, update_ptr: tl.tensor, norm_weight_ptr: tl.tensor, weight_ptr: tl.tensor,
                 bias_ptr: tl.tensor, new_residual_ptr: tl.tensor, out_ptr: tl.tensor, batch: tl.tensor,
                 width: tl.tensor, rows: tl.tensor, eps: tl.tensor, stride_xb: tl.tensor, stride_ub: tl.tensor,
                 stride_nb: tl.tensor, stride_wr: tl.tensor, stride_ob: tl.tensor, NORM: tl.constexpr,
                 HAS_UPDATE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                 BLOCK_ROWS: tl.constexpr) -> None:
    """BLOCK_ROWS rows of weight · v for every sequence of the batch, v = x, or with NORM v = norm(x + update)
    rounded to the weight's dtype. A program loads its weight rows once, all of them in one tile so that the
    whole matrix is in flight at once (a product of so few vectors waits on memory, not arithmetic), then
    computes each sequence's v itself: the norm of a short row costs less than a kernel of its own. With NORM
    the first program stores the residual."""
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (BLOCK_ROWS,) output rows
    i = tl.arange(0, BLOCK)  # (BLOCK,) columns, the whole row
    live = i < width
    w = tl.load(weight_ptr + r[:, None] * stride_wr + i[None, :], mask=(r[:, None] < rows) & live[None, :],
                other=0.0).to(tl.float32)  # (BLOCK_ROWS, BLOCK)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + r, mask=r < rows, other=0.0).to(tl.float32)
    for b in range(batch):
        if NORM:
            v = _add_rms_norm_row(x_ptr + b * stride_xb, update_ptr + b * stride_ub, norm_weight_ptr,
                                  new_residual_ptr + b * stride_nb, i, live, width, eps,
                                  tl.where(tl.program_id(0) == 0, width, 0), HAS_UPDATE)
            v = v.to(weight_ptr.dtype.element_ty).to(tl.float32)  # rounded to the model's dtype, as unfused
        else:
            v = tl.load(x_ptr + b * stride_xb + i, mask=live, other=0.0).to(tl.float32)
        out = tl.sum(w * v[None, :], axis=1)  # (BLOCK_ROWS,)
        if HAS_BIAS:
            out += bias
        tl.store(out_ptr + b * stride_ob + r, out.to(out_ptr.dtype.element_ty), mask=r < rows)


def _gemv(x: Tensor, update: Tensor | None, norm_weight: Tensor | None, eps: float, weight: Tensor,
          bias: Tensor | None, new_residual: Tensor | None) -> Tensor:
    """Launches `_gemv_kernel` (NORM when norm_weight is given). Returns out (b, rows) in weight's dtype."""
    b, width = x.shape
    rows = weight.shape[0]
    assert x.stride(1) == 1 and (update is None or update.stride(1) == 1) and weight.stride(1) == 1
    block = triton.next_power_of_2(width)
    block_rows = max(1, GEMV_TILE // block)
    out = torch.empty(b, rows, dtype=weight.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(rows, block_rows),)](
        x, update if update is not None else x, norm_weight if norm_weight is not None else weight, weight,
        bias if bias is not None else weight, new_residual if new_residual is not None else out, out, b, width,
        rows, eps, x.stride(0), update.stride(0) if update is not None else 0,
        new_residual.stride(0) if new_residual is not None else 0, weight.stride(0), out.stride(0),
        NORM=norm_weight is not None, HAS_UPDATE=update is not None, HAS_BIAS=bias is not None, BLOCK=block,
        BLOCK_ROWS=block_rows, num_warps=GEMV_WARPS)
    return out


@jit
def _rows_matmul_kernel(x_ptr: tl.tensor, weight_ptr: tl.tensor, bias_ptr: tl.tensor, out_ptr: tl.tensor,
                        batch: tl.tensor, width: tl.tensor, rows: tl.tensor, stride_xb: tl.tensor, stride_wr: tl.tensor,
                        stride_ob: tl.tensor, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, STAGES: tl.constexpr) -> None:
    """Output columns n (BLOCK_N,) of x · weightᵀ for every sequence (BLOCK_B ≥ batch rows), float32 sums."""
    s = tl.arange(0, BLOCK_B)  # (BLOCK_B,) sequences
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) weight rows
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, width, BLOCK_K, num_stages=STAGES):
        k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,) columns
        x = tl.load(x_ptr + s[:, None] * stride_xb + k[None, :], mask=(s[:, None] < batch) & (k[None, :] < width),
                    other=0.0)  # (BLOCK_B, BLOCK_K)
        w = tl.load(weight_ptr + n[:, None] * stride_wr + k[None, :], mask=(n[:, None] < rows) & (k[None, :] < width),
                    other=0.0)  # (BLOCK_N, BLOCK_K)
        # in float32, whose TF32 products are exact for 16-bit inputs (and Triton's interpreter has no bfloat16 dot)
        acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n < rows, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + s[:, None] * stride_ob + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(s[:, None] < batch) & (n[None, :] < rows))


def rows_matmul(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (b, D) · weight (N, D)ᵀ + bias for a batch of some dozens of sequences, 16-bit, in weight's dtype: one
    program per ROWS_MATMUL_BLOCK_N output columns takes every sequence, so the weights are read once."""
    b, width = x.shape
    rows = weight.shape[0]
    assert x.stride(1) == 1 and weight.stride(1) == 1 and x.dtype == weight.dtype and weight.element_size() == 2
    out = torch.empty(b, rows, dtype=weight.dtype, device=x.device)
    _rows_matmul_kernel[(triton.cdiv(rows, ROWS_MATMUL_BLOCK_N),)](
        x, weight, bias if bias is not None else weight, out, b, width, rows, x.stride(0), weight.stride(0),
        out.stride(0), HAS_BIAS=bias is not None, BLOCK_B=max(16, triton.next_power_of_2(b)),
        BLOCK_N=ROWS_MATMUL_BLOCK_N, BLOCK_K=ROWS_MATMUL_BLOCK_K, STAGES=ROWS_MATMUL_STAGES,
        num_warps=ROWS_MATMUL_WARPS)
    return out


def _matmul(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A projection past the GEMV: `rows_matmul` for more than GEMV_MAX_ROWS and up to ROWS_MATMUL_MAX_ROWS sequences
    of 16-bit weights (float32 ones would lose bits in its TF32 products), cuBLAS otherwise."""
    if GEMV_MAX_ROWS < x.shape[0] <= ROWS_MATMUL_MAX_ROWS and weight.element_size() == 2:
        return rows_matmul(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def add_rms_norm_linear(residual: Tensor, update: Tensor | None, norm_weight: Tensor, eps: float, weight: Tensor,
                        bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`contract.Ops.add_rms_norm_linear`. Up to GEMV_MAX_ROWS sequences it is one kernel (the
    residual add, the RMSNorm and the product) where a program takes GEMV_NORM_MIN_ROWS weight rows or more; a
    larger batch or a wider row is the norm, then a matrix product (`_matmul`)."""
    wide = GEMV_TILE // triton.next_power_of_2(residual.shape[1]) < GEMV_NORM_MIN_ROWS
    if residual.shape[0] > GEMV_MAX_ROWS or wide:
        residual, normed = add_rms_norm(residual, update, norm_weight, eps, weight.dtype)
        return residual, _matmul(normed, weight, bias)
    assert norm_weight.is_contiguous()
    new_residual = torch.empty_like(residual)
    return new_residual, _gemv(residual, update, norm_weight, eps, weight, bias, new_residual)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`contract.Ops.linear`: x (b, D) · weight (N, D)ᵀ + bias. One GEMV kernel up to GEMV_MAX_ROWS
    sequences, where cuBLAS's matrix-product kernels leave most of the GPU idle; a matrix product above."""
    if x.shape[0] > GEMV_MAX_ROWS:
        return _matmul(x, weight, bias)
    return _gemv(x, None, None, 0.0, weight, bias, None)
