"""Where the short-chunk scans (`runtime.ops.triton_short_scan`) beat mamba_ssm's, swept on the GPU.

A batch of equal-length prompt chunks through one layer's scan, shaped as the named models' layers with random bf16
inputs in the layouts the CUDA back-end hands each (a short chunk's tensors token-major, a long one's channels-first
views of its convolution and projections), both ways in the same run: for a Mamba1 shape `mamba1_scan`'s scan and
out_proj, by mamba_ssm's `selective_scan_fn` (with `triton_scan_state` after it for a chunk that continues a state:
`cuda_ops.long_chunk_scan`) and by the short kernel; for a Mamba2 shape the scan on a discretised Δ, by mamba_ssm's
`mamba_chunk_scan_combined` (`cuda_ops.long_chunk_ssd_scan`) and by the short kernel. µs per call in a replayed CUDA
graph, for each batch and chunk length. `launch_classes.SHORT_CHUNK` (the longest chunk that takes the short kernels)
should be the longest length at which they win at every batch of the sweep. `--sweep` also times Mamba1's short kernel's
launch constants at one batch and length.

    python -m bench.gpu_short_scan --shapes 130m,1.4b,mamba2-780m,mamba2-2.7b --json $OUT/short_scan.json
    python -m bench.gpu_short_scan --shapes 130m --batch 64 --lengths 64 --sweep
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from runtime.ops import cuda_ops, launch_classes, triton_short_scan

from .gpu_kernels import D_STATE, MAMBA2_D_STATE, MAMBA2_HEAD_DIM, constants, graph_us
from .gpu_models import MAMBA2_SHAPES, SHAPES
from .report import print_row, print_table, save_json

CALLS = 8  # calls per graph replay (on the same tensors)
BLOCKS, WARPS = (16, 32, 64), (2, 4, 8)  # the short kernel's launch constants tried by --sweep


def scan_inputs(shape: str, batch: int, length: int, from_state: bool, short: bool, seed: int = 0) -> dict:
    """`cuda_ops.mamba1_scan`'s arguments for a layer of `shape`: x, dt, z (b, l, d) and B, C (b, l, n), bf16,
    token-major for the `short` kernel, else (b, l, ·) views of (b, ·, l) storage; A, D, dt_bias float32; out_proj
    bf16; h0 (b, d, n) float32 or None."""
    d_model = SHAPES[shape][0]
    d, rank = 2 * d_model, math.ceil(d_model / 16)
    g = torch.Generator("cuda").manual_seed(seed)

    def randn(*size, dtype=torch.float32, scale=1.0):
        return (torch.randn(*size, device="cuda", generator=g) * scale).to(dtype)

    def laid_out(rows: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:  # (b, l, rows)
        if short:
            return (randn(batch, length, rows, scale=scale) + shift).to(torch.bfloat16)
        return (randn(batch, rows, length, scale=scale) + shift).to(torch.bfloat16).transpose(1, 2)

    projected = laid_out(rank + 2 * D_STATE)  # x_proj's output: [dt_low | B | C]
    return dict(x=laid_out(d), dt=laid_out(d, 0.5, -1.0), A=-torch.exp(randn(d, D_STATE, scale=0.5)),
                B=projected[..., rank:rank + D_STATE], C=projected[..., rank + D_STATE:], D=randn(d),
                z=laid_out(d), h0=randn(batch, d, D_STATE) if from_state else None, dt_bias=randn(d, scale=0.1),
                out_weight=randn(d_model, d, dtype=torch.bfloat16, scale=d ** -0.5))


def mamba2_scan_inputs(shape: str, batch: int, length: int, from_state: bool, short: bool, seed: int = 0) -> dict:
    """The Mamba2 scan's arguments for a layer of `shape`: x (b, l, h, p) and B, C (b, l, 1, n) as views of the
    convolution's (b, l, c) output, bf16, token-major for the `short` kernel, else a view of (b, c, l) storage; Δ
    (b, l, h), A, D float32; h0 or None."""
    d = 2 * SHAPES[shape][0]
    heads, n = d // MAMBA2_HEAD_DIM, MAMBA2_D_STATE
    g = torch.Generator("cuda").manual_seed(seed)
    if short:
        xBC = torch.randn(batch, length, d + 2 * n, device="cuda", generator=g).to(torch.bfloat16)
    else:
        xBC = torch.randn(batch, d + 2 * n, length, device="cuda", generator=g).to(torch.bfloat16).transpose(1, 2)
    x, B, C = torch.split(xBC, [d, n, n], dim=-1)
    return dict(x=x.unflatten(-1, (heads, MAMBA2_HEAD_DIM)), B=B[..., None, :], C=C[..., None, :],
                delta=torch.rand(batch, length, heads, device="cuda", generator=g) * 0.1,
                A=-torch.rand(heads, device="cuda", generator=g) - 0.5,
                D=torch.randn(heads, device="cuda", generator=g),
                h0=torch.randn(batch, heads, MAMBA2_HEAD_DIM, n, device="cuda", generator=g) if from_state else None)


def scan_us(t: dict, short: bool) -> float:
    """µs per call of the scan on `t` (a Mamba1 layer's with out_proj, or a Mamba2 layer's), by the short kernel or
    by mamba_ssm's."""
    if "delta" in t:  # Mamba2
        args2 = (t["x"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["h0"])
        scan = triton_short_scan.mamba2_short_scan if short else cuda_ops.long_chunk_ssd_scan
        return graph_us([lambda: scan(*args2)] * CALLS)
    args = (t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["h0"])

    def call():
        if short:
            y, _ = triton_short_scan.mamba1_short_scan(*args[:2], t["dt_bias"], *args[2:], None)
        else:
            y, _ = cuda_ops.long_chunk_scan(*args, dt_bias=t["dt_bias"], delta_scale=None)
        return F.linear(y, t["out_weight"])

    return graph_us([call] * CALLS)


def sweep_constants(shape: str, batch: int, length: int, from_state: bool) -> list[dict]:
    """Mamba1's short kernel's time for each program width × SCAN_WARPS (the width taken whatever the batch); the
    last row names the fastest."""
    t = scan_inputs(shape, batch, length, from_state, short=True)
    rows: list[dict] = []
    for block, warps in itertools.product(BLOCKS, WARPS):
        widths = {"NARROW_CHANNELS": block, "WIDE_CHANNELS": block, "SCAN_WARPS": warps}
        with constants(widths, (launch_classes, triton_short_scan)):
            rows.append({"shape": shape, "batch": batch, "length": length, "channels": block,
                         "SCAN_WARPS": warps, "short_us": scan_us(t, True)})
        print_row(rows[-1])
    best = min(rows, key=lambda row: row["short_us"])
    rows.append({"shape": shape, "best": {k: best[k] for k in ("channels", "SCAN_WARPS")}})
    print_row(rows[-1])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="130m,1.4b")
    parser.add_argument("--batch", default="1,8,64,256")
    parser.add_argument("--lengths", default="16,32,64,128,256")
    parser.add_argument("--from-state", action="store_true", help="chunks that continue a state")
    parser.add_argument("--sweep", action="store_true",
                        help="the short kernel's launch constants, at the first batch and length")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    shapes, batches = args.shapes.split(","), [int(b) for b in args.batch.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    rows: list[dict] = []
    if args.sweep:
        for shape in shapes:
            rows += sweep_constants(shape, batches[0], lengths[0], args.from_state)
    lines = []
    for shape, batch, length in itertools.product(shapes, batches, lengths):
        inputs = mamba2_scan_inputs if shape in MAMBA2_SHAPES else scan_inputs
        long_us = scan_us(inputs(shape, batch, length, args.from_state, short=False), False)
        short_us = scan_us(inputs(shape, batch, length, args.from_state, short=True), True)  # each freed after
        rows.append({"shape": shape, "batch": batch, "length": length, "mamba_ssm_us": long_us, "short_us": short_us,
                     "ratio": short_us / long_us})
        print_row(rows[-1])
        lines.append([shape, str(batch), str(length), f"{long_us:.1f}", f"{short_us:.1f}", f"{short_us / long_us:.2f}"])
    for shape in shapes:  # the longest length up to which the short kernel wins at every batch and length
        timed = [r for r in rows if r.get("shape") == shape and "ratio" in r]
        longest = max((n for n in lengths if all(r["ratio"] < 1 for r in timed if r["length"] <= n)), default=0)
        rows.append({"shape": shape, "short_wins_up_to": longest})
        print_row(rows[-1])
    state = "continuing a state" if args.from_state else "from zero"
    print(f"\n{torch.cuda.get_device_name()}, chunks {state}, µs per call (Mamba1: scan + out_proj; Mamba2: scan)")
    print_table(["shape", "batch", "tokens a chunk", "mamba_ssm", "short kernel", "short ÷ mamba_ssm"], lines)
    save_json(rows, args.json)


if __name__ == "__main__":
    main()
