"""Which prompt-chunk lengths launch every variant of the CUDA prefill kernels that Triton compiles apart.

Triton compiles a kernel anew, at its first launch, for each class of its integer arguments: 1 (made a
constant), a multiple of 16, any other value. A chunk's length reaches the kernels as lengths and strides (its
residue by 16 decides their classes) and, in Mamba2's chunked scan (`mamba_chunk_scan_combined`), as the count of
its SSD_CHUNK-token chunks; and short chunks take other kernels than long ones. A server that runs one chunk of each
class at start compiles nothing while serving."""

from __future__ import annotations

from ..config import MAMBA2

SSD_CHUNK = 256  # chunk length of mamba_chunk_scan_combined; the result does not depend on it
# A chunk of at most SHORT_CHUNK tokens takes the short-chunk kernels (the convolution in `triton_short_conv`, the
# Mamba1 and Mamba2 scans in `triton_short_scan`), a longer one the long-sequence ones; `python -m
# bench.gpu_short_scan` finds the lengths at which the short scans win; 0 turns the short kernels off
SHORT_CHUNK = 64
RESIDUES = range(1, 18)  # 1 to 17: every residue by 16, with 1 (a constant) and 17 apart
SSD_CHUNK_COUNTS = (1, 2, 16)  # one of each class: a constant 1, other, a multiple of 16


def chunk_length_classes(arch: str, longest: int) -> list[int]:
    """Chunk lengths up to `longest` (the longest chunk the server prefills) holding one of every class: each
    residue by 16 on both sides of SHORT_CHUNK, and for Mamba2 with each class of SSD chunk count."""
    counts = SSD_CHUNK_COUNTS if arch == MAMBA2 else (1,)
    starts = sorted({SHORT_CHUNK, *((n - 1) * SSD_CHUNK for n in counts)})  # each start + 1 to 17 tokens
    return [length for start in starts for r in RESIDUES if (length := start + r) <= longest]
