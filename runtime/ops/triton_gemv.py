"""Fused Triton kernels for a decode step's generic pieces, behind the operator contract (`contract.Ops`):
  - `add_rms_norm`: a block's residual connection and the next block's RMSNorm;
  - `add_rms_norm_linear`: the same followed by the next block's in_proj, one kernel for a batch of a few;
  - `linear`: a projection (out_proj) of a batch of a few, where cuBLAS's kernels leave most of the GPU idle.
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
GEMV_TILE = 8192  # weight elements a GEMV program loads, in one tile (16 KiB of bfloat16); more for the rows below
GEMV_WARPS = 8
# Weight rows a GEMV program takes at least, plain and with the norm fused (bench.gpu_kernels): one row a program
# was slower for the Mamba2 2.7b out_proj's 5,120-wide rows than two, and with the norm fused each program
# recomputes its sequences' norm, whose reads rival the weights' where it takes two rows (the 2.7b in_proj).
GEMV_MIN_ROWS = 2
GEMV_NORM_MIN_ROWS = 4
GEMV_MAX_TILE = 16384  # the largest tile bench.gpu_kernels sweeps: a row too wide for the rows above, cuBLAS


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


def _gemv_rows(width: int, min_rows: int) -> int | None:
    """Weight rows a GEMV program takes for rows `width` wide (loaded rounded up to a power of two): GEMV_TILE
    elements' worth, at least `min_rows`; None where those would be more than GEMV_MAX_TILE elements."""
    block = int(triton.next_power_of_2(width))
    rows = max(min_rows, GEMV_TILE // block)
    return rows if rows * block <= GEMV_MAX_TILE else None


def _gemv(x: Tensor, update: Tensor | None, norm_weight: Tensor | None, eps: float, weight: Tensor,
          bias: Tensor | None, new_residual: Tensor | None, block_rows: int) -> Tensor:
    """Launches `_gemv_kernel` (NORM when norm_weight is given), block_rows weight rows a program. Returns out
    (b, rows) in weight's dtype."""
    b, width = x.shape
    rows = weight.shape[0]
    assert x.stride(1) == 1 and (update is None or update.stride(1) == 1) and weight.stride(1) == 1
    block = triton.next_power_of_2(width)
    out = torch.empty(b, rows, dtype=weight.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(rows, block_rows),)](
        x, update if update is not None else x, norm_weight if norm_weight is not None else weight, weight,
        bias if bias is not None else weight, new_residual if new_residual is not None else out, out, b, width,
        rows, eps, x.stride(0), update.stride(0) if update is not None else 0,
        new_residual.stride(0) if new_residual is not None else 0, weight.stride(0), out.stride(0),
        NORM=norm_weight is not None, HAS_UPDATE=update is not None, HAS_BIAS=bias is not None, BLOCK=block,
        BLOCK_ROWS=block_rows, num_warps=GEMV_WARPS)
    return out


def add_rms_norm_linear(residual: Tensor, update: Tensor | None, norm_weight: Tensor, eps: float, weight: Tensor,
                        bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`contract.Ops.add_rms_norm_linear`. Up to GEMV_MAX_ROWS sequences it is one kernel (the residual add,
    the RMSNorm and the product) where a program's GEMV_NORM_MIN_ROWS rows fit its tile; a larger batch or a
    wider row is the norm, then a matrix product, left to cuBLAS."""
    block_rows = _gemv_rows(residual.shape[1], GEMV_NORM_MIN_ROWS)
    if residual.shape[0] > GEMV_MAX_ROWS or block_rows is None:
        residual, normed = add_rms_norm(residual, update, norm_weight, eps, weight.dtype)
        return residual, torch.nn.functional.linear(normed, weight, bias)
    assert norm_weight.is_contiguous()
    new_residual = torch.empty_like(residual)
    return new_residual, _gemv(residual, update, norm_weight, eps, weight, bias, new_residual, block_rows)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`contract.Ops.linear`: x (b, D) · weight (N, D)ᵀ + bias. One GEMV kernel up to GEMV_MAX_ROWS
    sequences where a program's GEMV_MIN_ROWS rows fit its tile, where cuBLAS's matrix-product kernels leave
    most of the GPU idle; cuBLAS otherwise."""
    block_rows = _gemv_rows(x.shape[1], GEMV_MIN_ROWS)
    if x.shape[0] > GEMV_MAX_ROWS or block_rows is None:
        return torch.nn.functional.linear(x, weight, bias)
    return _gemv(x, None, None, 0.0, weight, bias, None, block_rows)
