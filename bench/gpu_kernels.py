"""The launch shapes of the fused Triton decode kernels (`runtime.ops.triton_ssm`, `triton_gemv`), swept on the GPU.

Each op of a decode step runs on 24 layers in a captured CUDA graph (as in a decode step: each layer's weights
are its own, so they come from memory, not the L2 cache), shaped as the named models' layers with random
weights, for every value of its launch constants, beside the cuBLAS composition it replaces; the table gives µs
per call and the setting with the least time summed over the shapes, which is what those modules' constants
should be. The projections (`in_proj`, `out_proj`) take Mamba1 and Mamba2 shapes, `mamba1_decode` Mamba1's, and
Mamba2's convolution and state update (`conv_step`, `mamba2_step`) Mamba2's, the convolution's constants those
past a batch of GEMV_MAX_ROWS.

    python -m bench.gpu_kernels --json $OUT/kernels.json
    python -m bench.gpu_kernels --ops in_proj,out_proj --shapes 130m,1.4b,mamba2-780m,mamba2-2.7b
    python -m bench.gpu_kernels --ops conv_step,mamba2_step --shapes mamba2-780m,mamba2-2.7b --batch 64
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
from typing import Any
from pathlib import Path

import torch
import torch.nn.functional as F

from runtime.ops import torch_ops, triton_gemv, triton_mamba2, triton_ssm
from runtime.ops.contract import Mamba1Weights

from .gpu_models import MAMBA2_SHAPES, SHAPES
from .report import print_row, print_table, save_json

LAYERS = 24  # calls per graph replay: one decode step's worth
REPLAYS = 50
D_STATE, CONV_K = 16, 4
MAMBA2_D_STATE, MAMBA2_HEAD_DIM = 128, 64


@contextlib.contextmanager
def constants(values: dict, modules: tuple = (triton_gemv, triton_ssm, triton_mamba2)):
    """The kernel modules' constants set to `values` for the duration (each name in the first of `modules` that has
    it)."""
    owner = {name: next(m for m in modules if hasattr(m, name)) for name in values}
    old = {name: getattr(owner[name], name) for name in values}
    for name, value in values.items():
        setattr(owner[name], name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(owner[name], name, value)


def graph_us(calls: list) -> float:
    """µs per call of the `calls` (one per layer), all of them replayed per CUDA graph (after compiling and
    warming up)."""
    calls[0]()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (REPLAYS * len(calls))


def layer_tensors(shape: str, batch: int, seed: int) -> dict:
    """A Mamba1 layer's decode inputs and weights of `shape`, bf16 weights and float32 states; for a Mamba2 shape,
    its in_proj's rows (x, z, B, C of d_state 128 and a Δ per head of 64 channels)."""
    d_model = SHAPES[shape][0]
    d, rank = 2 * d_model, math.ceil(d_model / 16)
    in_rows = 2 * d + (2 * 128 + d // 64 if shape in MAMBA2_SHAPES else 0)
    g = torch.Generator("cuda").manual_seed(seed)

    def randn(*size, dtype=torch.bfloat16, scale=1.0):
        return (torch.randn(*size, device="cuda", generator=g) * scale).to(dtype)

    return dict(
        residual=randn(batch, d_model, dtype=torch.float32), update=randn(batch, d_model),
        norm_weight=randn(d_model), in_proj=randn(in_rows, d_model, scale=d_model ** -0.5),
        projected=randn(batch, 2 * d), conv_state=randn(batch, d, CONV_K - 1), conv_weight=randn(d, CONV_K),
        conv_bias=randn(d), x_proj=randn(rank + 2 * D_STATE, d, scale=d ** -0.5), dt_proj=randn(d, rank),
        dt_bias=randn(d, dtype=torch.float32), h=randn(batch, d, D_STATE, dtype=torch.float32),
        A_log=randn(d, D_STATE, dtype=torch.float32), D=randn(d, dtype=torch.float32),
        y=randn(batch, d), out_proj=randn(d_model, d, scale=d ** -0.5),
        # Mamba2's convolution (x, B and C) and state update
        xBC=randn(batch, d + 2 * MAMBA2_D_STATE), xBC_state=randn(batch, d + 2 * MAMBA2_D_STATE, CONV_K - 1),
        xBC_weight=randn(d + 2 * MAMBA2_D_STATE, CONV_K), xBC_bias=randn(d + 2 * MAMBA2_D_STATE),
        heads_h=randn(batch, d // MAMBA2_HEAD_DIM, MAMBA2_HEAD_DIM, MAMBA2_D_STATE, dtype=torch.float32),
        heads_x=randn(batch, d // MAMBA2_HEAD_DIM, MAMBA2_HEAD_DIM), heads_dt=randn(batch, d // MAMBA2_HEAD_DIM),
        heads_bias=randn(d // MAMBA2_HEAD_DIM, dtype=torch.float32),
        heads_A_log=randn(d // MAMBA2_HEAD_DIM, dtype=torch.float32),
        heads_D=randn(d // MAMBA2_HEAD_DIM, dtype=torch.float32), B=randn(batch, 1, MAMBA2_D_STATE),
        C=randn(batch, 1, MAMBA2_D_STATE),
    )


def ops(t: dict) -> dict:
    """name -> (the fused op, the cuBLAS / PyTorch composition it replaces) on the tensors `t`."""
    x, z = t["projected"].chunk(2, dim=-1)
    weights = Mamba1Weights(t["conv_weight"], t["conv_bias"], t["x_proj"], t["dt_proj"], t["dt_bias"], t["A_log"],
                            t["D"])
    decode_args = (x, z, t["conv_state"], t["h"], weights)
    no_scales: dict[str, Any] = dict(delta_scale=None, a_scale=None)

    def composed_in_proj():
        _, normed = triton_gemv.add_rms_norm(t["residual"], t["update"], t["norm_weight"], 1e-5, torch.bfloat16)
        F.linear(normed, t["in_proj"])

    conv_args = (t["xBC"], t["xBC_state"], t["xBC_weight"], t["xBC_bias"])
    step_args = (t["heads_h"], t["heads_x"], t["heads_dt"], t["B"], t["C"], t["heads_D"])
    step_kwargs = dict(dt_bias=t["heads_bias"], dt_limit=(0.0, float("inf")), A_log=t["heads_A_log"], **no_scales)
    return {
        "conv_step": (lambda: triton_ssm.causal_conv1d_step(*conv_args),
                      lambda: torch_ops.causal_conv1d_step(*conv_args)),
        "mamba2_step": (lambda: triton_mamba2.mamba2_step(*step_args, **step_kwargs),
                        lambda: torch_ops.mamba2_step(*step_args, **step_kwargs)),
        "in_proj": (lambda: triton_gemv.add_rms_norm_linear(t["residual"], t["update"], t["norm_weight"], 1e-5,
                                                            t["in_proj"]), composed_in_proj),
        "mamba1_decode": (lambda: triton_ssm.mamba1_decode(*decode_args, **no_scales),
                          lambda: torch_ops.composed_mamba1_decode(triton_ssm.causal_conv1d_step,
                                                                   triton_ssm.mamba1_step, *decode_args, **no_scales)),
        "out_proj": (lambda: triton_gemv.linear(t["y"], t["out_proj"]), lambda: F.linear(t["y"], t["out_proj"])),
    }


SWEEPS = {  # op -> its launch constants and the values tried
    "in_proj": {"GEMV_TILE": [4096, 8192, 16384], "GEMV_NORM_MIN_ROWS": [1, 2, 4, 8], "GEMV_WARPS": [4, 8]},
    "out_proj": {"GEMV_TILE": [4096, 8192, 16384], "GEMV_MIN_ROWS": [1, 2, 4], "GEMV_WARPS": [4, 8]},
    "conv_step": {"CONV_BATCH_CHANNELS": [16, 64, 128, 256, 512], "CONV_BATCH_WARPS": [1, 2, 4]},
    "mamba2_step": {"BLOCK_HEAD_CHANNELS": [16, 32, 64], "STEP_WARPS": [4, 8]},
    "mamba1_decode": {"X_PROJ_ROWS": [8, 16, 32], "X_PROJ_CHANNELS": [256, 512, 1024], "X_PROJ_WARPS": [4],
                      "BLOCK_CHANNELS": [16, 32], "DECODE_WARPS": [2, 4]},
}
STAGES = {"mamba1_decode": [["X_PROJ_ROWS", "X_PROJ_CHANNELS", "X_PROJ_WARPS"], ["BLOCK_CHANNELS", "DECODE_WARPS"]]}


def sweep(op: str, shapes: list[str], batch: int) -> list[dict]:
    """Every setting of the op's constants (stage by stage, later stages at the earlier ones' best) timed on
    every shape; returns the rows, the last naming the setting with the least time summed over the shapes."""
    layers = {shape: [layer_tensors(shape, batch, seed) for seed in range(LAYERS)] for shape in shapes}

    def time_on(shape: str, which: int) -> float:  # which: 0 the fused op, 1 the composition
        return graph_us([ops(t)[op][which] for t in layers[shape]])

    rows: list[dict] = []
    best: dict[str, int] = {}
    for names in STAGES.get(op, [list(SWEEPS[op])]):
        totals: dict[tuple[int, ...], float] = {}
        for values in itertools.product(*(SWEEPS[op][name] for name in names)):
            setting = {**best, **dict(zip(names, values))}
            with constants(setting):
                times = {shape: time_on(shape, 0) for shape in shapes}
            totals[tuple(values)] = sum(times.values())
            row = {"op": op, "batch": batch, **setting, **{f"{s}_us": us for s, us in times.items()}}
            print_row(row)
            rows.append(row)
        best.update(zip(names, min(totals.items(), key=lambda tried: tried[1])[0]))
    for shape in shapes:
        rows.append({"op": op, "batch": batch, "composed": True, f"{shape}_us": time_on(shape, 1)})
        print_row(rows[-1])
    rows.append({"op": op, "batch": batch, "best": best})
    print_row(rows[-1])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="130m,1.4b")
    parser.add_argument("--ops", default=",".join(SWEEPS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    shapes = args.shapes.split(",")
    rows = [row for op in args.ops.split(",") for row in sweep(op, shapes, args.batch)]
    lines = []
    for op in args.ops.split(","):
        mine = [r for r in rows if r["op"] == op]
        best = mine[-1]["best"]
        fused = [r for r in mine if all(r.get(k) == v for k, v in best.items()) and "composed" not in r][-1]
        composed = {s: next(r[f"{s}_us"] for r in mine if r.get("composed") and f"{s}_us" in r) for s in shapes}
        lines.append([op, str(best)] + [f"{fused[f'{s}_us']:.2f} / {composed[s]:.2f}" for s in shapes])
    print(f"\n{torch.cuda.get_device_name()}, batch {args.batch}, µs per call: fused / composed")
    print_table(["op", "best constants"] + shapes, lines)
    save_json(rows, args.json)


if __name__ == "__main__":
    main()
