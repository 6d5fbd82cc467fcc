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
GEMV_TILE = 8192  # weight elements a GEMV program loads, in one tile (16 KiB of bfloat16)
GEMV_WARPS = 8
GEMV_PIECES = True  # a row in two pieces of powers of two (`_pieces`), not one rounded up
# Each GEMV program of add_rms_norm_linear recomputes the norm of its row: where a program would take fewer weight
# rows than this (`_gemv_rows`), the norm's reads rival the
# weights', and the norm's own kernel then cuBLAS is faster (bench.gpu_kernels: the Mamba2 2.7b shape's in_proj,
# 2 rows a program). The other measured shapes take 4 or more.
GEMV_NORM_MIN_ROWS = 4


@jit
def _residual_piece(residual_ptr: tl.tensor, update_ptr: tl.tensor, new_residual_ptr: tl.tensor, i: tl.tensor,
                    live: tl.tensor, store: tl.tensor, HAS_UPDATE: tl.constexpr) -> tl.tensor:
    """A sequence's residual (+ update) at the columns i where live, rounded to the residual stream's dtype as
    PyTorch's sum rounds it (stored where `store`), as float32."""
    r = tl.load(residual_ptr + i, mask=live, other=0.0).to(tl.float32)
    if HAS_UPDATE:
        r += tl.load(update_ptr + i, mask=live, other=0.0).to(tl.float32)
    r = r.to(new_residual_ptr.dtype.element_ty)
    tl.store(new_residual_ptr + i, r, mask=store)
    return r.to(tl.float32)


@jit
def _add_rms_norm_kernel(residual_ptr: tl.tensor, update_ptr: tl.tensor, weight_ptr: tl.tensor,
                         new_residual_ptr: tl.tensor, out_ptr: tl.tensor, width: tl.tensor, eps: tl.tensor,
                         stride_rb: tl.tensor, stride_ub: tl.tensor, stride_nb: tl.tensor, stride_ob: tl.tensor,
                         HAS_UPDATE: tl.constexpr, BLOCK: tl.constexpr) -> None:
    b = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    live = i < width
    r = _residual_piece(residual_ptr + b * stride_rb, update_ptr + b * stride_ub, new_residual_ptr + b * stride_nb,
                        i, live, live, HAS_UPDATE)
    inverse_rms = 1.0 / tl.sqrt(tl.sum(r * r, axis=0) / width + eps)
    out = r * inverse_rms * tl.load(weight_ptr + i, mask=live, other=0.0).to(tl.float32)
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
                 HAS_UPDATE: tl.constexpr, HAS_BIAS: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr,
                 BLOCK_ROWS: tl.constexpr) -> None:
    """BLOCK_ROWS rows of weight · v for every sequence of the batch, v = x, or with NORM v = norm(x + update)
    rounded to the weight's dtype. A program loads its weight rows once, all of them at once so that the whole
    matrix is in flight (a product of so few vectors waits on memory, not arithmetic): a row is two pieces of
    powers of two, columns [0, HEAD) and [HEAD, HEAD + TAIL) (TAIL 0: none), so that a width that is not a power
    of two is not rounded up to one. Each program then computes each sequence's v itself: the norm of a short
    row costs less than a kernel of its own. With NORM the first program stores the residual."""
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (BLOCK_ROWS,) output rows
    i = tl.arange(0, HEAD)  # (HEAD,) the row's first columns
    live = i < width
    w = tl.load(weight_ptr + r[:, None] * stride_wr + i[None, :], mask=(r[:, None] < rows) & live[None, :],
                other=0.0).to(tl.float32)  # (BLOCK_ROWS, HEAD)
    if TAIL > 0:
        j = HEAD + tl.arange(0, TAIL)  # (TAIL,) the rest of the row
        live_j = j < width
        w_tail = tl.load(weight_ptr + r[:, None] * stride_wr + j[None, :],
                         mask=(r[:, None] < rows) & live_j[None, :], other=0.0).to(tl.float32)  # (BLOCK_ROWS, TAIL)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + r, mask=r < rows, other=0.0).to(tl.float32)
    stored_width = tl.where(tl.program_id(0) == 0, width, 0)  # the first program stores the residual
    for b in range(batch):
        if NORM:
            residual = _residual_piece(x_ptr + b * stride_xb, update_ptr + b * stride_ub,
                                       new_residual_ptr + b * stride_nb, i, live, i < stored_width, HAS_UPDATE)
            squares = tl.sum(residual * residual, axis=0)
            if TAIL > 0:
                residual_tail = _residual_piece(x_ptr + b * stride_xb, update_ptr + b * stride_ub,
                                                new_residual_ptr + b * stride_nb, j, live_j, j < stored_width,
                                                HAS_UPDATE)
                squares += tl.sum(residual_tail * residual_tail, axis=0)
            inverse_rms = 1.0 / tl.sqrt(squares / width + eps)
            # rounded to the model's dtype, as unfused
            v = (residual * inverse_rms * tl.load(norm_weight_ptr + i, mask=live, other=0.0).to(tl.float32)
                 ).to(weight_ptr.dtype.element_ty).to(tl.float32)
            if TAIL > 0:
                v_tail = (residual_tail * inverse_rms
                          * tl.load(norm_weight_ptr + j, mask=live_j, other=0.0).to(tl.float32)
                          ).to(weight_ptr.dtype.element_ty).to(tl.float32)
        else:
            v = tl.load(x_ptr + b * stride_xb + i, mask=live, other=0.0).to(tl.float32)
            if TAIL > 0:
                v_tail = tl.load(x_ptr + b * stride_xb + j, mask=live_j, other=0.0).to(tl.float32)
        out = tl.sum(w * v[None, :], axis=1)  # (BLOCK_ROWS,)
        if TAIL > 0:
            out += tl.sum(w_tail * v_tail[None, :], axis=1)
        if HAS_BIAS:
            out += bias
        tl.store(out_ptr + b * stride_ob + r, out.to(out_ptr.dtype.element_ty), mask=r < rows)


def _pieces(width: int) -> tuple[int, int]:
    """A row's two pieces, HEAD and TAIL columns (powers of two, TAIL 0 for none): the largest power of two
    within the width and the rest rounded up to one; with GEMV_PIECES off, the whole width rounded up."""
    whole = int(triton.next_power_of_2(width))
    if not GEMV_PIECES or whole == width:
        return whole, 0
    head = whole // 2
    return head, int(triton.next_power_of_2(width - head))


def _gemv_rows(width: int) -> int:
    """Weight rows a GEMV program takes for rows `width` wide: the most, a power of two, whose pieces fit in
    GEMV_TILE elements (at least one)."""
    fits = max(1, GEMV_TILE // sum(_pieces(width)))
    return 1 << (fits.bit_length() - 1)


def _gemv(x: Tensor, update: Tensor | None, norm_weight: Tensor | None, eps: float, weight: Tensor,
          bias: Tensor | None, new_residual: Tensor | None) -> Tensor:
    """Launches `_gemv_kernel` (NORM when norm_weight is given). Returns out (b, rows) in weight's dtype."""
    b, width = x.shape
    rows = weight.shape[0]
    assert x.stride(1) == 1 and (update is None or update.stride(1) == 1) and weight.stride(1) == 1
    head, tail = _pieces(width)
    block_rows = _gemv_rows(width)
    out = torch.empty(b, rows, dtype=weight.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(rows, block_rows),)](
        x, update if update is not None else x, norm_weight if norm_weight is not None else weight, weight,
        bias if bias is not None else weight, new_residual if new_residual is not None else out, out, b, width,
        rows, eps, x.stride(0), update.stride(0) if update is not None else 0,
        new_residual.stride(0) if new_residual is not None else 0, weight.stride(0), out.stride(0),
        NORM=norm_weight is not None, HAS_UPDATE=update is not None, HAS_BIAS=bias is not None, HEAD=head,
        TAIL=tail, BLOCK_ROWS=block_rows, num_warps=GEMV_WARPS)
    return out


def add_rms_norm_linear(residual: Tensor, update: Tensor | None, norm_weight: Tensor, eps: float, weight: Tensor,
                        bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`contract.Ops.add_rms_norm_linear`. Up to GEMV_MAX_ROWS sequences it is one kernel (the
    residual add, the RMSNorm and the product) where a program takes GEMV_NORM_MIN_ROWS weight rows or more; a
    larger batch or a wider row is the norm, then a matrix product, left to cuBLAS."""
    if residual.shape[0] > GEMV_MAX_ROWS or _gemv_rows(residual.shape[1]) < GEMV_NORM_MIN_ROWS:
        residual, normed = add_rms_norm(residual, update, norm_weight, eps, weight.dtype)
        return residual, torch.nn.functional.linear(normed, weight, bias)
    assert norm_weight.is_contiguous()
    new_residual = torch.empty_like(residual)
    return new_residual, _gemv(residual, update, norm_weight, eps, weight, bias, new_residual)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`contract.Ops.linear`: x (b, D) · weight (N, D)ᵀ + bias. One GEMV kernel up to GEMV_MAX_ROWS
    sequences, where cuBLAS's matrix-product kernels leave most of the GPU idle; cuBLAS above."""
    if x.shape[0] > GEMV_MAX_ROWS:
        return torch.nn.functional.linear(x, weight, bias)
    return _gemv(x, None, None, 0.0, weight, bias, None)
