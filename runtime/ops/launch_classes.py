"""Which prompt-chunk lengths launch every variant of the CUDA prefill kernels that Triton compiles apart.

Triton compiles a kernel anew, at its first launch, for each class of its integer arguments: 1 (made a
constant), a multiple of 16, any other value. A chunk's length reaches the kernels as lengths and strides (its
residue by 16 decides their classes) and, in Mamba2's chunked scan (`mamba_chunk_scan_combined`), as the count of
its SSD_CHUNK-token chunks; and short chunks take other kernels than long ones. Mamba1's short scan also takes wider
programs for a large batch (`scan_channels`), and a short step whose rows are padded passes each row's length: other
variants again. A server that runs one chunk of each class at start compiles nothing while serving."""

from __future__ import annotations

from ..config import MAMBA2

SSD_CHUNK = 256  # chunk length of mamba_chunk_scan_combined; the result does not depend on it
# A chunk of at most SHORT_CHUNK tokens takes the short-chunk kernels (the convolution in `triton_short_conv`, the
# Mamba1 and Mamba2 scans in `triton_short_scan`), a longer one the long-sequence ones; `python -m
# bench.gpu_short_scan` finds the lengths at which the short scans win; 0 turns the short kernels off
SHORT_CHUNK = 64
RESIDUES = range(1, 18)  # 1 to 17: every residue by 16, with 1 (a constant) and 17 apart
SSD_CHUNK_COUNTS = (1, 2, 16)  # one of each class: a constant 1, other, a multiple of 16
# Mamba1's short scan's programs: a program's walk through the chunk is a chain of dependent steps, so the scan is
# bound by the latency of a step, and a batch with fewer programs than the GPU holds at once takes narrow programs
# (more of them, each step shorter); a batch of many takes wide ones (fewer steps in all)
NARROW_CHANNELS, WIDE_CHANNELS = 32, 64
WIDE_PAST = 32 * 1024  # sequences × channels past which a program takes WIDE_CHANNELS


def scan_channels(batch: int, channels: int) -> int:
    """The channels a program of Mamba1's short scan takes, for a batch of `batch` sequences of `channels`."""
    return WIDE_CHANNELS if batch * channels >= WIDE_PAST else NARROW_CHANNELS


def wide_batch(arch: str, channels: int, slots: int) -> int | None:
    """The smallest batch of at most `slots` sequences whose short scan takes wide programs (Mamba1 of `channels`
    inner channels), or None: none does, or the kernel has one width (Mamba2)."""
    if arch == MAMBA2:
        return None
    return next((b for b in range(1, slots + 1) if scan_channels(b, channels) == WIDE_CHANNELS), None)


def chunk_length_classes(arch: str, longest: int) -> list[int]:
    """Chunk lengths up to `longest` (the longest chunk the server prefills) holding one of every class: each
    residue by 16 on both sides of SHORT_CHUNK, and for Mamba2 with each class of SSD chunk count."""
    counts = SSD_CHUNK_COUNTS if arch == MAMBA2 else (1,)
    starts = sorted({SHORT_CHUNK, *((n - 1) * SSD_CHUNK for n in counts)})  # each start + 1 to 17 tokens
    return [length for start in starts for r in RESIDUES if (length := start + r) <= longest]
